"""The linear datamodeling score: the math against scipy by hand, and ``projidx evaluate lds`` end to end on a tiny
case (M = 4 retrains of 24 digits): it resumes without redoing finished retrains and refuses bad templates in one
line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from projidx.analysis.lds import (
    bootstrap_interval,
    lds_per_query,
    leave_out_summary,
    random_rows,
    subset_masks,
    top_rows,
)
from projidx.cli.main import main
from projidx.errors import ProjidxError
from projidx.settings import METHODS
from tests.test_cli import assert_clean_error


def test_subset_masks_are_seeded_and_of_the_asked_size():
    a = subset_masks(10, 5, 0.5, seed=3)
    assert a.shape == (5, 10) and (a.sum(axis=1) == 5).all()
    np.testing.assert_array_equal(a, subset_masks(10, 5, 0.5, seed=3))
    assert not np.array_equal(a, subset_masks(10, 5, 0.5, seed=4))
    with pytest.raises(ProjidxError, match="alpha"):
        subset_masks(10, 5, 1.0, seed=0)


def test_lds_is_the_spearman_of_summed_scores_and_minus_the_loss():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 5)) < 0.5
    scores = rng.normal(size=(2, 5))
    outputs = rng.normal(size=(6, 2))
    got = lds_per_query(scores, masks, outputs)
    for q in range(2):
        predicted = [scores[q, m].sum() for m in masks]
        assert got[q] == pytest.approx(stats.spearmanr(predicted, -outputs[:, q]).statistic)
    # a perfect predictor: the loss falls exactly as the subset's summed scores rise
    perfect = -(scores @ masks.T).T
    np.testing.assert_allclose(lds_per_query(scores, masks, perfect), [1.0, 1.0])
    assert np.isnan(lds_per_query(scores, masks, np.ones((6, 2)))).all()  # a constant output: undefined


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(1).normal(0.3, 0.1, size=50)
    lo, hi = bootstrap_interval(values)
    assert lo < values.mean() < hi and hi - lo < 0.1


@pytest.fixture(scope="module")
def lds_setup(tmp_path_factory):
    """A tiny projidx model on 24 digits and its store, through the CLI."""
    from projidx.data.datasets import load_dataset

    d = tmp_path_factory.mktemp("lds")
    digits = load_dataset("digits:train").subset(slice(0, 24))
    np.savez(d / "train.npz", images=digits.images.numpy(), ids=digits.ids.numpy())
    test = load_dataset("digits:test").subset(slice(0, 5))
    np.savez(d / "queries.npz", images=test.images.numpy(), ids=test.ids.numpy())
    run = CliRunner().invoke
    assert run(main, ["train", "--data", str(d / "train.npz"), "--out", str(d / "ck"), "--epochs", "2",
                      "--checkpoints", "2", "--width", "8"]).exit_code == 0
    for objective in ("dtrak", "loss"):
        result = run(main, ["featurize", "--checkpoints", str(d / "ck"), "--data", str(d / "train.npz"), "--store",
                            str(d / f"{objective}.zarr"), "--timesteps", "2", "--proj-dim", "32",
                            "--objective", objective])
        assert result.exit_code == 0, result.output
    return d


def _lds(d, out, *extra):
    return CliRunner().invoke(main, ["evaluate", "lds", "--store", str(d / "dtrak.zarr"), "--store",
                                     str(d / "loss.zarr"), "--queries", str(d / "queries.npz"), "--out", str(out),
                                     "--subsets", "4", "--output-timesteps", "2", "--output-draws", "1", *extra])


def test_leave_out_rows_and_summary_against_a_by_hand_reference():
    scores = np.array([[0.1, 0.9, 0.5, 0.9, -1.0], [3.0, 2.0, 1.0, 0.0, -1.0]])
    np.testing.assert_array_equal(top_rows(scores, 2), [[1, 3], [0, 1]])  # a tie at 0.9: both in, sorted
    rand = random_rows(50, 4, 5, seed=3)
    assert rand.shape == (4, 5) and all(len(set(r)) == 5 and (np.diff(r) > 0).all() for r in rand)
    np.testing.assert_array_equal(rand, random_rows(50, 4, 5, seed=3))
    assert not np.array_equal(rand, random_rows(50, 4, 5, seed=4))
    top, rnd = np.array([0.3, 0.1, 0.5, 0.0]), np.array([0.1, 0.2, 0.1, 0.0])
    s = leave_out_summary(top, rnd, seed=0)
    assert s["rise_top"] == pytest.approx(0.225) and s["rise_random"] == pytest.approx(0.1)
    assert s["difference"] == pytest.approx(0.125) and s["share_top_larger"] == pytest.approx(0.5)
    assert s["difference_ci95"][0] <= 0.125 <= s["difference_ci95"][1]
    for k in (0, 5):
        with pytest.raises(ProjidxError, match="leave_out must"):
            top_rows(scores, k)


def test_evaluate_lds_leave_out_removes_the_top_rows_and_reuses_its_retrains(lds_setup, tmp_path, monkeypatch):
    from projidx.reports import evaluation

    out = tmp_path / "lo"
    args = ("--leave-out", "3", "--leave-out-queries", "2", "--leave-out-methods", "matched,dtrak")
    first = _lds(lds_setup, out, *args)
    assert first.exit_code == 0, first.output
    lo = json.loads((out / "lds.json").read_text())["leave_out"]
    assert lo["k"] == 3 and lo["queries"] == 2 and (out / "leave_out.png").stat().st_size > 1000
    assert set(lo["methods"]) == {"dtrak.zarr/matched", "dtrak.zarr/dtrak", "loss.zarr/matched", "loss.zarr/dtrak"}
    folders = sorted((out / "leave_out").iterdir())
    assert len(folders) == lo["retrains"] <= 1 + 2 + 2 * 4
    kept = {tuple(json.loads((f / "subset.json").read_text())["rows"]) for f in folders}
    for name, r in lo["methods"].items():
        for removed in r["removed"]:  # each removal set was retrained on exactly the other 21 rows
            assert len(removed) == 3 and tuple(sorted(set(range(24)) - set(removed))) in kept, name
        assert len(r["rise"]) == 2 and r["difference"] == pytest.approx(np.mean(r["rise"]) - np.mean(lo["rise_random"]))
    assert tuple(range(24)) in kept  # the full-data model
    calls = []
    monkeypatch.setattr(evaluation, "_retrain", lambda job: calls.append(job) or None)
    again = _lds(lds_setup, out, *args)  # every retrain finished: none is redone
    assert again.exit_code == 0, again.output
    assert calls == []
    assert json.loads((out / "lds.json").read_text())["leave_out"]["methods"] == lo["methods"]


@pytest.mark.parametrize("k", ["24", "-1"])
def test_evaluate_lds_refuses_a_bad_leave_out_in_one_line(lds_setup, tmp_path, k):
    assert_clean_error(_lds(lds_setup, tmp_path / "badk", "--leave-out", k), "--leave-out must")
    assert not (tmp_path / "badk").exists()


def test_evaluate_lds_reports_every_method_and_resumes(lds_setup, tmp_path):
    out = tmp_path / "lds"
    first = _lds(lds_setup, out)
    assert first.exit_code == 0, first.output
    report = json.loads((out / "lds.json").read_text())
    methods = {(r["store"], r["method"]) for r in report["results"]}
    assert ("dtrak.zarr", "dtrak") in methods and ("loss.zarr", "das") in methods and len(methods) == 2 * len(METHODS)
    assert len(report["per_query"]["dtrak.zarr/dtrak"]) == 5 and (out / "lds.png").stat().st_size > 1000
    assert report["n_train"] == 24 and report["output"]["seed"] == 424242
    finished = {p: p.stat().st_mtime_ns for p in (out / "retrains").glob("*/model/*.pt")}
    assert len(finished) == 4 * 2  # 4 retrains x 2 checkpoints
    # a killed run: one retrain's outputs torn, one retrain gone, another's subset record torn
    next((out / "retrains" / "001").glob("outputs-*.npy")).write_bytes(b"\x93NUMPY")
    import shutil

    shutil.rmtree(out / "retrains" / "002")
    (out / "retrains" / "003" / "subset.json").write_text("{")
    again = _lds(lds_setup, out)
    assert again.exit_code == 0, again.output
    kept = {p: p.stat().st_mtime_ns for p in (out / "retrains").glob("*/model/*.pt")}
    for p, mtime in finished.items():  # retrains 000 and 001 were not redone; 002 and 003 were
        if p.parts[-3] in ("000", "001"):
            assert kept[p] == mtime
        else:
            assert kept[p] != mtime
    assert json.loads((out / "lds.json").read_text())["results"] == report["results"]  # same subsets, same answers


def test_evaluate_lds_with_a_train_command_in_two_processes(lds_setup, tmp_path):
    command = (f"{sys.executable} -m projidx train --data {{subset_file}} --out {{out}} --epochs 1 --checkpoints 1"
               " --width 8")
    result = _lds(lds_setup, tmp_path / "cmd", "--train-command", command, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cmd" / "retrains").glob("*/model/manifest.json"))) == 4


@pytest.mark.parametrize(("command", "message"), [
    ("echo {out}", "must contain {subset_file}"),
    ("exit 7 # {subset_file} {out}", "exited with 7"),
    ("true {subset_file} {out}", "wrote no checkpoints"),
])
def test_evaluate_lds_refuses_bad_templates_in_one_line(lds_setup, tmp_path, command, message):
    assert_clean_error(_lds(lds_setup, tmp_path / "bad", "--train-command", command), message)


def test_evaluate_lds_refuses_stores_of_other_rows(lds_setup, tmp_path):
    from projidx.data.datasets import load_dataset

    other = load_dataset("digits:train").subset(slice(24, 48))
    np.savez(tmp_path / "other.npz", images=other.images.numpy(), ids=other.ids.numpy())
    CliRunner().invoke(main, ["featurize", "--checkpoints", str(lds_setup / "ck"), "--data",
                              str(tmp_path / "other.npz"), "--store", str(tmp_path / "o.zarr"), "--timesteps", "2",
                              "--proj-dim", "32"])
    result = CliRunner().invoke(main, ["evaluate", "lds", "--store", str(lds_setup / "dtrak.zarr"), "--store",
                                       str(tmp_path / "o.zarr"), "--queries", str(lds_setup / "queries.npz"), "--out",
                                       str(tmp_path / "x"), "--subsets", "4"])
    assert_clean_error(result, "other training rows")
