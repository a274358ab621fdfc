"""Issue 'Trust': the noise policy, the two seeds, the timestep-matched method, validate, and the audit's fixes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from projidx.analysis.bias import unique_ratio
from projidx.errors import ProjidxError
from projidx.features.featurization import FeaturizeConfig, featurize, featurize_queries
from projidx.models.checkpoints import CheckpointSet
from projidx.models.diffusion import QUERY_NOISE, TRAIN_NOISE, NoiseSchedule, noise_for, timestep_grid
from projidx.reports.validate import check_queries, failures, shift_one_pixel, validate_store
from projidx.search.scoring import exact_scores, matched_vectors, query_vectors, side_vectors, source_ranks
from projidx.settings import METHODS
from projidx.store.feature_store import StoreMeta
from tests.test_cli import assert_clean_error, run

SHAPE = (1, 8, 8)


def test_shared_noise_depends_on_checkpoint_timestep_draw_and_seed_only():
    a = noise_for(3, [1, 2, 99], 1, [50, 50, 50], 0, SHAPE, TRAIN_NOISE, "shared")
    q = noise_for(3, [7], 1, [50], 0, SHAPE, QUERY_NOISE, "shared")
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2]) and torch.equal(a[0], q[0])
    for other in (noise_for(4, [1], 1, [50], 0, SHAPE, policy="shared"), noise_for(3, [1], 2, [50], 0, SHAPE,
                  policy="shared"), noise_for(3, [1], 1, [51], 0, SHAPE, policy="shared"),
                  noise_for(3, [1], 1, [50], 1, SHAPE, policy="shared")):
        assert not torch.equal(other[0], a[0])
    mixed = noise_for(3, [1, 2], 1, [50, 60], 0, SHAPE, policy="shared")
    assert torch.equal(mixed[0], a[0]) and torch.equal(mixed[1], noise_for(3, [5], 1, [60], 0, SHAPE,
                                                                           policy="shared")[0])


def test_per_sample_noise_differs_by_sample_and_side():
    a = noise_for(3, [1, 2], 1, [50, 50], 0, SHAPE, TRAIN_NOISE, "per-sample")
    q = noise_for(3, [1], 1, [50], 0, SHAPE, QUERY_NOISE, "per-sample")
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], q[0])
    with pytest.raises(ValueError, match="noise policy"):
        noise_for(3, [1], 1, [50], 0, SHAPE, policy="common")


def test_stores_written_before_the_policy_read_as_per_sample(tmp_path, tiny_ckpts, tiny_data):
    store = featurize(tiny_ckpts, tiny_data.subset(slice(0, 8)), tmp_path / "s.zarr",
                      FeaturizeConfig(proj_dim=16, train_timesteps="replay"), progress=False, allow_other_data=True)
    d = store.meta.to_dict()
    assert d["noise"] == "shared"
    del d["noise"]
    assert StoreMeta.from_dict(d).noise == "per-sample"


def test_the_two_seeds_are_separate(tmp_path, tiny_ckpts, tiny_data):
    data = tiny_data.subset(slice(0, 8))
    base = dict(proj_dim=32, dtype="float32", timesteps=2)

    def arrays(name, **seeds):
        s = featurize(tiny_ckpts, data, tmp_path / f"{name}.zarr", FeaturizeConfig(**base, **seeds), progress=False)
        cid = s.meta.checkpoint_ids[-1]
        return np.asarray(s.group[f"features/{cid}"][:]), np.asarray(s.group[f"norms/{cid}"][:])

    f0, n0 = arrays("a", projection_seed=0, noise_seed=0)
    f1, n1 = arrays("b", projection_seed=1, noise_seed=0)
    f2, n2 = arrays("c", projection_seed=0, noise_seed=1)
    assert np.array_equal(n0, n1) and not np.allclose(f0, f1)  # the projection alone: exact norms unchanged
    assert not np.allclose(n0, n2)  # the noise alone: other gradients


@pytest.mark.parametrize("noise", ["shared", "per-sample"])
def test_shared_noise_makes_a_training_image_its_own_query(tmp_path, tiny_ckpts, tiny_data, noise):
    """With shared noise and the store's own grid and draws, a training image's query features are its stored
    features, so matched scores it at its maximum sum_c w_c; per-sample noise does not."""
    data = tiny_data.subset(slice(0, 10))
    store = featurize(tiny_ckpts, data, tmp_path / "s.zarr",
                      FeaturizeConfig(proj_dim=64, dtype="float32", timesteps=3, noise=noise), progress=False)
    qf = featurize_queries(store, tiny_ckpts, data.subset(slice(0, 4)), progress=False)
    assert qf.timesteps == store.meta.timesteps and qf.features[0].shape[1] == 3
    for c, cid in enumerate(store.meta.checkpoint_ids):
        stored = np.asarray(store.group[f"norms/{cid}"][:4])
        assert np.allclose(qf.norms[c], stored, rtol=1e-4) == (noise == "shared")
    own = np.diag(exact_scores(store, query_vectors(store, qf, "matched"), "matched")[:, :4])
    assert np.allclose(own, sum(store.weights()), rtol=1e-4) == (noise == "shared")


def test_matched_compares_each_timestep_only_with_the_same_timestep():
    """Queries whose gradient at t equals the training gradient at t+1 (and is orthogonal to it at t): ReTrac,
    which averages over t first, scores them high; matched scores them near zero. Equal pairs score 1."""
    rng = np.random.default_rng(0)
    k, times = 4096, [1, 200, 400, 600, 800]
    basis = np.linalg.qr(rng.normal(size=(k, len(times) + 1)))[0].T  # orthonormal directions
    train = basis[None, :-1].astype(np.float32)  # (1, G, k)
    shifted = basis[None, 1:].astype(np.float32)  # query at t = train at the next t
    ones = np.ones((1, len(times)), np.float32)

    def score(method, q):
        u = side_vectors(method, train, ones, ones[:, 0], 1.0, times, seed=3)
        v = side_vectors(method, q, ones, ones[:, 0], 1.0, times, seed=3)
        return float((u @ v.T)[0, 0])

    assert score("matched", train) == pytest.approx(1.0, abs=1e-5)
    assert abs(score("matched", shifted)) < 0.1  # cross terms: about sqrt(G (G-1) / k) / G
    assert score("retrac", shifted) == pytest.approx((len(times) - 1) / len(times) ** 2, abs=1e-5)


def test_matched_estimates_the_mean_cosine_without_bias():
    rng = np.random.default_rng(1)
    k, times = 2048, list(range(10))
    a = rng.normal(size=(1, 10, k))
    b = a + rng.normal(size=(1, 10, k)) * np.linspace(0.2, 3, 10)[None, :, None]
    a, b = (x / np.linalg.norm(x, axis=2, keepdims=True) for x in (a, b))
    exact = float((a * b).sum(axis=2).mean())
    estimates = [float((matched_vectors(a.astype(np.float32), times, s)
                        @ matched_vectors(b.astype(np.float32), times, s).T)[0, 0]) for s in range(40)]
    assert abs(np.mean(estimates) - exact) < 4 * np.std(estimates) / np.sqrt(40) + 0.01
    assert np.std(estimates) < 3 * np.sqrt(90 / k) / 10


def test_matched_needs_a_grid_store_and_its_grid(tmp_path, tiny_ckpts, tiny_data, tiny_queries):
    data = tiny_data.subset(slice(0, 8))
    replay = featurize(tiny_ckpts, data, tmp_path / "r.zarr", FeaturizeConfig(proj_dim=16, train_timesteps="replay"),
                       progress=False, allow_other_data=True)
    qf = featurize_queries(replay, tiny_ckpts, tiny_queries, 3, 1, progress=False)
    with pytest.raises(ProjidxError, match="grid-mode store"):
        query_vectors(replay, qf, "matched")
    grid = featurize(tiny_ckpts, data, tmp_path / "g.zarr", FeaturizeConfig(proj_dim=16, timesteps=3), progress=False)
    qf = featurize_queries(grid, tiny_ckpts, tiny_queries, 4, 1, progress=False)
    with pytest.raises(ProjidxError, match="store's grid"):
        query_vectors(grid, qf, "matched")
    query_vectors(grid, qf, "retrac")  # the paper's methods take any query grid


def test_source_ranks_equal_ranks_in_the_full_score_matrix(tmp_path, tiny_ckpts, tiny_data, tiny_queries):
    store = featurize(tiny_ckpts, tiny_data, tmp_path / "s.zarr", FeaturizeConfig(proj_dim=32, timesteps=2,
                                                                                  chunk_rows=7), progress=False)
    qf = featurize_queries(store, tiny_ckpts, tiny_queries, progress=False)
    sources = np.array([0, 13, 39, 20, 6])
    for method in ("tracin", "matched"):
        qv = query_vectors(store, qf, method)
        full = exact_scores(store, qv, method)
        expected = [(np.delete(row, s) > row[s]).sum() for row, s in zip(full, sources, strict=True)]
        np.testing.assert_array_equal(source_ranks(store, qv, method, sources), expected)


def test_validate_finds_training_images_with_the_defaults(tmp_path, tiny_ckpts, tiny_data):
    store = featurize(tiny_ckpts, tiny_data, tmp_path / "s.zarr", FeaturizeConfig(proj_dim=256, timesteps=4),
                      progress=False)
    report = validate_store(store, tiny_ckpts, tiny_data, samples=8, seed=1)
    assert set(report["methods"]) == set(METHODS)  # every method a grid store with losses can score
    assert report["methods"]["matched"]["self"]["top1"] == 1.0
    assert len(report["sample_ids"]) == 8 and set(report["sample_ids"]) <= set(tiny_data.ids.tolist())
    with pytest.raises(ProjidxError, match="not the training data"):
        validate_store(store, tiny_ckpts, tiny_data.subset(slice(0, 39)))


def test_check_queries_are_the_source_perturbed():
    from projidx.data.datasets import load_dataset

    train = load_dataset("digits:train").subset(slice(0, 20))
    sets = check_queries(train, np.array([3, 7]), 6 / 255, 0)
    assert torch.equal(sets["self"].images, train.images[[3, 7]])
    noise = (sets["near-copy"].images - train.images[[3, 7]]).std()
    assert 0.5 * 12 / 255 < noise < 1.5 * 12 / 255
    shifted = sets["shift"].images
    assert torch.equal(shifted[..., 1:], train.images[[3, 7]][..., :-1])
    assert torch.equal(shift_one_pixel(train.images[:1])[..., 0], train.images[:1][..., 0])
    assert all(torch.equal(s.ids, train.ids[[3, 7]]) for s in sets.values())


def test_validate_thresholds_set_the_exit_status(tmp_path, monkeypatch, tiny_ckpt_dir):
    """The CLI prints the table, writes JSON and exits 1 naming each threshold the default method misses."""
    import projidx.reports.validate as validate_module

    def fake_report(*args, **kwargs):
        check = {"top1": 0.5, "top10": 0.75, "median_rank": 0.5, "ranks": [0, 3]}
        return {"samples": 2, "methods": {"matched": {c: dict(check) for c in ("self", "near-copy", "shift")}}}

    train = tmp_path / "train.npz"
    from projidx.data.datasets import load_dataset

    d = load_dataset("digits").subset(slice(0, 40))
    np.savez(train, images=((d.images.numpy() + 1) * 127.5).round().astype(np.uint8), ids=d.ids.numpy() + 1000)
    run("featurize", "--checkpoints", tiny_ckpt_dir, "--data", train, "--store", tmp_path / "s.zarr",
        "--timesteps", 2, "--proj-dim", 16)
    monkeypatch.setattr(validate_module, "validate_store", fake_report)
    ok = run("validate", "--store", tmp_path / "s.zarr", "--min-near-top10", 0.7, "--out", tmp_path / "v.json")
    assert "matched" in ok.output and "0.50 / 0.75" in ok.output
    assert json.loads((tmp_path / "v.json").read_text())["samples"] == 2
    bad = run("validate", "--store", tmp_path / "s.zarr", "--min-self-top1", 0.9, "--min-shift-top10", 0.8, ok=False)
    assert bad.exit_code == 1
    assert "matched self top1 0.50 < 0.90" in bad.output and "matched shift top10 0.75 < 0.80" in bad.output
    assert failures(fake_report(), "matched", {("near-copy", "top10"): 0.7}) == []


def test_cli_validate_refuses_other_data(tmp_path, tiny_ckpt_dir):
    from projidx.data.datasets import load_dataset

    d = load_dataset("digits").subset(slice(0, 40))
    train = tmp_path / "train.npz"
    np.savez(train, images=((d.images.numpy() + 1) * 127.5).round().astype(np.uint8))
    run("featurize", "--checkpoints", tiny_ckpt_dir, "--data", train, "--store", tmp_path / "s.zarr",
        "--timesteps", 2, "--proj-dim", 16)
    assert_clean_error(run("validate", "--store", tmp_path / "s.zarr", "--data", "digits:test", ok=False),
                       "not the training data")


def test_cosine_clipped_is_the_authors_schedule():
    assert float(NoiseSchedule("cosine").alphas_cumprod()[-1]) == pytest.approx(2.4e-9, rel=0.1)
    clipped = NoiseSchedule("cosine-clipped")
    assert float(clipped.alphas_cumprod()[-1]) == pytest.approx(3.2e-3, rel=0.05)
    betas = clipped.betas()
    assert float(betas.min()) >= 1e-4 and float(betas.max()) <= 0.02


def test_timestep_grids():
    assert timestep_grid(100, 1000) == np.linspace(1, 999, 100, dtype=int).tolist()  # the authors truncate
    assert timestep_grid(10, 1000)[:3] == [1, 111, 222]
    assert timestep_grid(10, 1000, "midpoints") == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert timestep_grid(3, 100, "midpoints") == [16, 50, 83]
    assert FeaturizeConfig().grid == "midpoints"
    with pytest.raises(ProjidxError, match="grid must be one of"):
        FeaturizeConfig(grid="ends")


def test_unique_ratio_does_not_count_empty_slots():
    assert unique_ratio(np.array([[1, 2, -1], [1, -1, -1]])) == pytest.approx(2 / 6)


def test_query_side_takes_loss_and_schedule_from_the_store(tmp_path, tiny_ckpts, tiny_data, tiny_queries):
    """A CheckpointSet claiming another loss and schedule cannot change the query features."""
    store = featurize(tiny_ckpts, tiny_data.subset(slice(0, 8)), tmp_path / "s.zarr",
                      FeaturizeConfig(proj_dim=32, timesteps=2), progress=False)
    right = featurize_queries(store, tiny_ckpts, tiny_queries, progress=False)
    liar = CheckpointSet(tiny_ckpts.model, tiny_ckpts.checkpoints, "l1", NoiseSchedule("cosine"),
                         tiny_ckpts.image_shape, tiny_ckpts.directory)
    other = featurize_queries(store, liar, tiny_queries, progress=False)
    for a, b in zip(right.norms, other.norms, strict=True):
        np.testing.assert_array_equal(a, b)
