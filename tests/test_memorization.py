"""Memorization ground truth: which generations reproduce a planted image, and how rankings are scored."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from projidx.analysis.memorization import (
    copy_rank,
    label_agreement,
    memorization_summary,
    nearest_rows,
    planted_layout,
    reproductions,
    wilson_interval,
)
from projidx.cli.main import main
from projidx.errors import ProjidxError


def test_planted_layout_puts_copies_after_the_base_rows():
    assert planted_layout(3, 2, 2).tolist() == [-1, -1, -1, 0, 0, 1, 1]
    with pytest.raises(ProjidxError, match="planting needs"):
        planted_layout(1, 2, 2)


def test_nearest_rows_equal_a_brute_force_search():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(37, 5)), rng.normal(size=(50, 5))
    dist, idx = nearest_rows(a, b, block=8)
    full = np.linalg.norm(a[:, None] - b[None], axis=2)
    np.testing.assert_array_equal(idx, full.argmin(axis=1))
    np.testing.assert_allclose(dist, full.min(axis=1), rtol=1e-5)
    self_dist, self_idx = nearest_rows(b, b, exclude_self=True, block=7)
    full = np.linalg.norm(b[:, None] - b[None], axis=2) + np.diag(np.full(len(b), np.inf))
    np.testing.assert_array_equal(self_idx, full.argmin(axis=1))


def _planted(seed: int = 0):
    """40 well-spread base points and 3 sources x 4 copies in 6-D; generations: near-copies of sources 0 and 2, a
    point between base points, and a source moved far away."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(40, 6)) * 3
    sources = rng.normal(size=(3, 6)) * 3
    source_of = planted_layout(40, 3, 4)
    train = np.concatenate([base, np.repeat(sources, 4, axis=0)])
    generated = np.stack([sources[0] + 0.01, sources[2] - 0.01, (base[0] + base[1]) / 2, sources[1] + 5.0])
    return train.astype(np.float32), generated.astype(np.float32), source_of


def test_reproductions_are_generations_near_a_copy_of_a_source():
    train, generated, source_of = _planted()
    truth = reproductions(generated, train, source_of)
    base_nn, _ = nearest_rows(train[:40], train[:40], exclude_self=True)
    assert truth.threshold == pytest.approx(np.quantile(base_nn, 0.05))
    assert truth.source.tolist() == [0, 2, -1, -1]
    assert truth.memorized.tolist() == [True, True, False, False]
    with pytest.raises(ProjidxError, match="quantile"):
        reproductions(generated, train, source_of, quantile=1.5)


def test_copy_rank_finds_the_first_copy_of_the_right_source():
    source_of = np.array([-1, -1, 0, 0, 1, 1])
    ranked = np.array([[2, 0, 1], [0, 4, 3], [0, 1, -1], [5, 3, 2]])
    assert copy_rank(ranked, source_of, np.array([0, 0, 1, 1])).tolist() == [0, 2, 3, 0]


def test_label_agreement_counts_empty_slots_as_disagreeing():
    labels = np.array([7, 7, 1, 2])
    ranked = np.array([[0, 1, 2, 3], [2, 3, -1, -1]])
    np.testing.assert_allclose(label_agreement(ranked, labels, np.array([7, 2])), [0.5, 0.25])


@pytest.mark.parametrize(("hits", "n"), [(0, 5), (10, 12), (52, 53), (53, 53)])
def test_wilson_interval_equals_scipys(hits, n):
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(hits, n)
    assert low == pytest.approx(ci.low, abs=2e-4) and high == pytest.approx(ci.high, abs=2e-4)
    assert low <= hits / n <= high


def test_summary_scores_reproductions_and_the_rest_apart():
    train, generated, source_of = _planted()
    truth = reproductions(generated, train, source_of)
    copies0, copies2 = np.flatnonzero(source_of == 0), np.flatnonzero(source_of == 2)
    ranked = np.array([[copies0[0], 0, 1], [0, copies2[1], 1], [0, 1, 2], [3, 4, 5]])
    train_labels = np.arange(len(train)) % 2
    s = memorization_summary(ranked, truth, source_of, train_labels, np.array([0, 0, 0, 1]))
    assert (s["memorized"], s["others"], s["k"]) == (2, 2, 3)
    assert s["top1"] == 0.5 and s["topk"] == 1.0 and s["mean_copy_rank"] == 0.5
    assert s["label_agreement"] == pytest.approx(np.mean([2 / 3, 2 / 3]))


def test_evaluate_memorization_end_to_end(tmp_path):
    out = tmp_path / "mem"
    args = ["evaluate", "memorization", "--data", "digits:train", "--out", str(out), "--base", "40", "--sources", "2",
            "--copies", "4", "--generate", "6", "--steps", "5", "--epochs", "2", "--checkpoints", "2", "--width", "8",
            "--timesteps", "2", "--proj-dim", "64", "--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "memorization.json").read_text())
    assert report["generated"] == 6 and report["memorized"] == report["methods"]["pixel"]["memorized"]
    assert {"pixel", "matched", "retrac", "tracin", "cosine", "dtrak"} <= set(report["methods"])
    # every generation is scored once: either as a reproduction or as one of the others
    for row in report["methods"].values():
        assert row["memorized"] + row["others"] == 6
    assert report["classifier_accuracy"] is not None  # digits carry labels
    assert "top-1" in result.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--base", "2000"], "planting needs base + sources"),
    (["--quantile", "2"], "--quantile must be in"),
    (["--train-command", "echo {data_file}"], "must contain {out}"),
    (["--train-command", "exit 3 # {data_file} {out}"], "exited with 3"),
    (["--train-command", "true {data_file} {out}"], "wrote no checkpoints"),
])
def test_evaluate_memorization_refuses_bad_input_in_one_line(tmp_path, extra, message):
    args = ["evaluate", "memorization", "--data", "digits:train", "--out", str(tmp_path / "m"), "--base", "40",
            "--sources", "2", "--copies", "2", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
