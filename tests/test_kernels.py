"""D-TRAK's and DAS's kernels: scores equal from-scratch TRAK / DAS formulas on the stored features (DAS's
residuals recomputed from the model); the kernel is cached and recomputed whenever the store changes; a store
without training losses refuses DAS."""

from __future__ import annotations

import importlib
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from projidx.errors import ProjidxError
from projidx.features.featurization import FeaturizeConfig, featurize, featurize_queries
from projidx.models.diffusion import TRAIN_NOISE, diffusion_loss, noise_for
from projidx.search.kernels import (
    RIDGE,
    DenseKernel,
    DualKernel,
    Kernel,
    das_residual,
    dual_inverse,
    kernel_files,
    regularized_inverse,
    store_kernel,
)
from projidx.search.scoring import check_method, exact_scores, exact_topk, query_vectors, scorable_methods
from projidx.store.feature_store import FeatureStore
from tests.test_cli import assert_clean_error, run

featurization_module = importlib.import_module("projidx.features.featurization")

CONFIG = FeaturizeConfig(proj_dim=48, timesteps=3, objective="dtrak", dtype="float32", chunk_rows=7)
DAS_CONFIG = replace(CONFIG, objective="output", train_draws=2)


def test_regularized_inverse_is_the_ridge_inverse():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(5, 8))  # N < k: the Gram matrix is singular
    gram = phi.T @ phi
    lam = RIDGE * np.trace(gram) / 8
    np.testing.assert_allclose(regularized_inverse(gram), np.linalg.inv(gram + lam * np.eye(8)), rtol=1e-4,
                               atol=1e-6)


def matrices(kernel: Kernel, k: int) -> np.ndarray:
    """(C, k, k) the inverses a kernel applies, whatever its form."""
    return np.stack([kernel.apply(c, np.eye(k, dtype=np.float32)) for c in range(len(kernel))])


def test_the_dual_form_of_few_rows_is_the_same_inverse():
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(6, 40)) * rng.uniform(0.1, 10, size=(6, 1))  # rows of unequal norms, n < k
    small, lam = dual_inverse(phi)
    dual = DualKernel(phi[None].astype(np.float32), small[None], np.array([lam]))
    dense = regularized_inverse(phi.T @ phi)
    np.testing.assert_allclose(matrices(dual, 40)[0], dense, rtol=1e-3, atol=1e-5 * np.abs(dense).max())
    q = rng.normal(size=(3, 40)).astype(np.float32)
    np.testing.assert_allclose(dual.apply(0, q), DenseKernel(dense[None]).apply(0, q), rtol=1e-3,
                               atol=1e-5 * np.abs(q @ dense).max())
    zero = DualKernel(np.zeros((1, 3, 5), np.float32), *[np.array([x]) for x in dual_inverse(np.zeros((3, 5)))])
    np.testing.assert_allclose(matrices(zero, 5)[0], np.eye(5))  # lambda 1 on zero rows


@pytest.fixture()
def das_store(tmp_path, tiny_ckpts, tiny_data):
    return featurize(tiny_ckpts, tiny_data.subset(slice(0, 20)), tmp_path / "das.zarr", DAS_CONFIG, progress=False,
                     allow_other_data=True)


def _phi(features: np.ndarray, norms: np.ndarray) -> np.ndarray:
    return np.einsum("ngk,ng->nk", features.astype(np.float64), norms.astype(np.float64)) / features.shape[1]


@pytest.mark.parametrize("proj_dim", [48, 8])  # fewer rows (20) than k: the dual form; more: the Gram matrix
def test_dtrak_scores_equal_the_trak_formula(tmp_path, tiny_ckpts, tiny_data, tiny_queries, proj_dim):
    store = featurize(tiny_ckpts, tiny_data.subset(slice(0, 20)), tmp_path / "d.zarr",
                      replace(CONFIG, proj_dim=proj_dim), progress=False, allow_other_data=True)
    qf = featurize_queries(store, tiny_ckpts, tiny_queries, progress=False)
    expected = np.zeros((len(tiny_queries), store.meta.n))
    c = len(store.meta.checkpoint_ids)
    for i, cid in enumerate(store.meta.checkpoint_ids):
        chunks = [chunk for _, chunk in store.chunks(cid)]
        big_phi = np.concatenate([_phi(ch.features, ch.norms) for ch in chunks])  # (N, k)
        gram = big_phi.T @ big_phi
        lam = RIDGE * np.trace(gram) / gram.shape[0]
        q_phi = _phi(qf.features[i], qf.norms[i])
        expected += q_phi @ np.linalg.solve(gram + lam * np.eye(len(gram)), big_phi.T) / c
    got = exact_scores(store, query_vectors(store, qf, "dtrak"), "dtrak")
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())
    # the kernel changes the ranking: it is not TracIn's inner product in disguise
    tracin = exact_scores(store, query_vectors(store, qf, "tracin"), "tracin")
    assert not np.array_equal(np.argsort(-got, axis=1)[:, :5], np.argsort(-tracin, axis=1)[:, :5])


@pytest.mark.parametrize(("method", "config", "form"), [("dtrak", CONFIG, DualKernel), ("das", DAS_CONFIG, DualKernel),
                                                      ("dtrak", replace(CONFIG, proj_dim=8), DenseKernel)])
def test_the_kernel_is_saved_once_and_recomputed_when_the_store_changes(tmp_path, tiny_ckpts, tiny_data,
                                                                         monkeypatch, method, config, form):
    import projidx.search.kernels as kernels

    store = featurize(tiny_ckpts, tiny_data.subset(slice(0, 20)), tmp_path / "k.zarr", config, progress=False,
                      allow_other_data=True)
    k = store.meta.projector.proj_dim
    assert isinstance(store_kernel(store, method), form)  # 20 rows: dual below k = 48, dense at k = 8
    first = matrices(store_kernel(store, method), k)
    array_file, sidecar = kernel_files(store, method)
    assert array_file.exists() and sidecar.exists()
    calls = []
    real = kernels.compute_kernel
    monkeypatch.setattr(kernels, "compute_kernel", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_array_equal(matrices(store_kernel(FeatureStore.open(store.path), method), k), first)
    assert calls == []  # read back, not recomputed
    array_file.write_bytes(b"torn")  # a damaged kernel file is recomputed, never read
    np.testing.assert_array_equal(matrices(store_kernel(store, method), k), first)
    assert calls == [1]
    # the store rebuilt at the same path from other rows: a new digest, a new kernel
    shutil.rmtree(store.path.local)
    rebuilt = featurize(tiny_ckpts, tiny_data.subset(slice(20, 40)), store.path.local, config, progress=False,
                        allow_other_data=True)
    again = matrices(store_kernel(rebuilt, method), k)
    assert calls == [1, 1]
    assert not np.allclose(again, first)


@pytest.mark.parametrize("proj_dim", [48, 8])  # 20 rows: the dual form below k, the Gram matrix above
def test_matched_trak_scores_equal_the_per_timestep_formula(tmp_path, tiny_ckpts, tiny_data, tiny_queries, proj_dim):
    """mean over (c, t) of < n(K_{c,t} f_{c,t}(q)), f_{c,t}(x) >, K_{c,t} the ridge inverse of the Gram matrix of the
    stored unit gradients at checkpoint c and timestep t alone, all from scratch."""
    store = featurize(tiny_ckpts, tiny_data.subset(slice(0, 20)), tmp_path / "m.zarr",
                      replace(CONFIG, proj_dim=proj_dim), progress=False, allow_other_data=True)
    qf = featurize_queries(store, tiny_ckpts, tiny_queries, progress=False)
    cids, grid = store.meta.checkpoint_ids, store.meta.timesteps
    expected = np.zeros((len(tiny_queries), store.meta.n))
    for c, cid in enumerate(cids):
        f = np.concatenate([ch.features.astype(np.float64) for _, ch in store.chunks(cid)])  # (N, G, k)
        for t in range(len(grid)):
            gram = f[:, t].T @ f[:, t]
            lam = RIDGE * np.trace(gram) / len(gram)
            u = np.linalg.solve(gram + lam * np.eye(len(gram)), qf.features[c][:, t].astype(np.float64).T).T
            expected += (u / np.linalg.norm(u, axis=1, keepdims=True)) @ f[:, t].T / (len(cids) * len(grid))
    got = exact_scores(store, query_vectors(store, qf, "matched-trak"), "matched-trak")
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())
    assert query_vectors(store, qf, "matched-trak").shape[1] == len(cids) * len(grid) * proj_dim
    # not D-TRAK's kernel over the mean gradient in disguise
    dtrak = exact_scores(store, query_vectors(store, qf, "dtrak"), "dtrak")
    assert not np.array_equal(np.argsort(-got, axis=1)[:, :5], np.argsort(-dtrak, axis=1)[:, :5])


def test_matched_trak_needs_a_grid_store_and_the_grid_s_queries(tmp_path, tiny_ckpts, tiny_data):
    replay = featurize(tiny_ckpts, tiny_data.subset(slice(0, 10)), tmp_path / "r.zarr",
                       replace(CONFIG, train_timesteps="replay"), progress=False, allow_other_data=True)
    assert "matched-trak" not in scorable_methods(replay)
    with pytest.raises(ProjidxError, match="needs a grid-mode store"):
        check_method(replay, "matched-trak")
    grid = featurize(tiny_ckpts, tiny_data.subset(slice(0, 10)), tmp_path / "g.zarr", CONFIG, progress=False,
                     allow_other_data=True)
    with pytest.raises(ProjidxError, match="needs the queries at the store's grid"):
        check_method(grid, "matched-trak", [1, 2])


@pytest.mark.parametrize("method", ["dtrak", "das", "matched-trak"])
def test_kernel_indices_answer_like_the_exact_scan(tmp_path, tiny_ckpts, tiny_data, tiny_queries, method):
    from projidx.search.index import build_index, load_index

    config = DAS_CONFIG if method == "das" else CONFIG
    store = featurize(tiny_ckpts, tiny_data.subset(slice(0, 20)), tmp_path / "i.zarr", config, progress=False,
                      allow_other_data=True)
    qf = featurize_queries(store, tiny_ckpts, tiny_queries, progress=False)
    qv = query_vectors(store, qf, method)
    build_index(store, method)
    found_scores, found = load_index(store, method).search(qv, 5)
    exact_s, exact = exact_topk(store, qv, method, 5)
    np.testing.assert_array_equal(found, exact)
    np.testing.assert_allclose(found_scores, exact_s, rtol=1e-4, atol=1e-6)


def test_das_residual_is_the_mean_of_the_normalized_root_losses():
    losses = np.array([[1.0, 4.0, 4.0], [0.0, 0.0, 0.0]])
    e = np.sqrt([1.0, 4.0, 4.0])
    np.testing.assert_allclose(das_residual(losses), [(e / np.linalg.norm(e)).mean(), 0.0], rtol=1e-6)


def test_das_scores_equal_the_formula_with_residuals_from_the_model(das_store, tiny_ckpts, tiny_data, tiny_queries):
    """phi: the mean of the stored unit gradients (read from the store); the ridge kernel from scratch; r_i from the
    model's per-sample MSE at the grid's timesteps and the store's noise draws, computed here again."""
    store, meta = das_store, das_store.meta
    data = tiny_data.subset(slice(0, 20))
    abar = meta.schedule.alphas_cumprod().float()
    qf = featurize_queries(store, tiny_ckpts, tiny_queries, progress=False)
    expected = np.zeros((len(tiny_queries), meta.n))
    c_count = len(meta.checkpoint_ids)
    model = tiny_ckpts.model.eval()
    for c, (ckpt, cid) in enumerate(zip(tiny_ckpts.checkpoints, meta.checkpoint_ids, strict=True)):
        model.load_state_dict(ckpt.load()["state_dict"])
        losses = np.zeros((meta.n, len(meta.timesteps)))
        for i, (x0, sid) in enumerate(zip(data.images, data.ids.tolist(), strict=True)):
            for j, t in enumerate(meta.timesteps):
                eps = torch.cat([noise_for(meta.noise_seed, [sid], c, [t], d, data.image_shape, TRAIN_NOISE,
                                           meta.noise) for d in range(meta.train_draws)])
                with torch.no_grad():
                    losses[i, j] = float(diffusion_loss(model, x0[None].expand(len(eps), *x0.shape),
                                                        torch.full((len(eps),), t), eps, abar, meta.loss).mean())
        stored = np.concatenate([ch.losses for _, ch in store.chunks(cid)])
        np.testing.assert_allclose(stored, losses, rtol=1e-4)
        e = np.sqrt(losses)
        r = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(axis=1)
        phi = np.concatenate([ch.features.astype(np.float64).mean(axis=1) for _, ch in store.chunks(cid)])
        gram = phi.T @ phi
        lam = RIDGE * np.trace(gram) / len(gram)
        q_phi = qf.features[c].astype(np.float64).mean(axis=1)
        expected += q_phi @ np.linalg.solve(gram + lam * np.eye(len(gram)), phi.T) * r / c_count
    got = exact_scores(store, query_vectors(store, qf, "das"), "das")
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())
    # the kernel changes the ranking: not ReTrac's inner product in disguise
    retrac = exact_scores(store, query_vectors(store, qf, "retrac"), "retrac")
    assert not np.array_equal(np.argsort(-got, axis=1)[:, :5], np.argsort(-retrac, axis=1)[:, :5])


def test_a_store_without_losses_refuses_das_in_one_line(tmp_path, tiny_ckpts, tiny_data, monkeypatch):
    real = featurization_module._store_meta
    monkeypatch.setattr(featurization_module, "_store_meta", lambda *a: replace(real(*a), losses=False))
    old = featurize(tiny_ckpts, tiny_data.subset(slice(0, 10)), tmp_path / "old.zarr", DAS_CONFIG, progress=False,
                    allow_other_data=True)
    assert "losses" not in dict(old.group.attrs)["projidx"] or not old.meta.losses
    assert "das" not in scorable_methods(old) and "dtrak" in scorable_methods(old)
    with pytest.raises(ProjidxError) as err:
        check_method(old, "das")
    assert "\n" not in str(err.value) and "training losses" in str(err.value)
    for args in (["index", "--store", old.path.local, "--method", "das"],
                 ["query", "--store", old.path.local, "--data", "digits:test", "--limit", 2, "--method", "das",
                  "--exact", "--out", tmp_path / "r.json"]):
        assert_clean_error(run(*args, ok=False), "method 'das' needs the training losses")
    # resumed by today's featurize, an older store keeps its own layout (no losses), never half of them
    monkeypatch.setattr(featurization_module, "_store_meta", real)
    resumed = featurize(tiny_ckpts, tiny_data.subset(slice(0, 10)), old.path.local, DAS_CONFIG, progress=False,
                        allow_other_data=True)
    assert not resumed.meta.losses and "das" not in scorable_methods(resumed)


@pytest.mark.parametrize(("patterns", "mode", "losses", "expected"), [
    ("lora", "grid", True, "matched-trak"), ("lora", "replay", True, "das"), ("lora", "replay", False, "dtrak"),
    ("*attn2*", "grid", False, "matched-trak"), ("all", "grid", True, "matched"), ("all", "replay", True, "cosine")])
def test_the_default_method_follows_what_the_store_can_score(patterns, mode, losses, expected):
    from types import SimpleNamespace

    from projidx.search.scoring import default_method

    meta = SimpleNamespace(params={"patterns": patterns}, train_timesteps=mode, losses=losses)
    assert default_method(SimpleNamespace(meta=meta, path="s.zarr")) == expected
