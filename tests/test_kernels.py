"""D-TRAK's kernel: scores equal a from-scratch TRAK formula on the stored features; the kernel is cached and
recomputed whenever the store changes."""

from __future__ import annotations

import numpy as np
import pytest

from projidx.features.featurization import FeaturizeConfig, featurize, featurize_queries
from projidx.search.kernels import RIDGE, kernel_files, regularized_inverse, store_kernel
from projidx.search.scoring import exact_scores, exact_topk, query_vectors
from projidx.store.feature_store import FeatureStore

CONFIG = FeaturizeConfig(proj_dim=48, timesteps=3, objective="dtrak", dtype="float32", chunk_rows=7)


def test_regularized_inverse_is_the_ridge_inverse():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(5, 8))  # N < k: the Gram matrix is singular
    gram = phi.T @ phi
    lam = RIDGE * np.trace(gram) / 8
    np.testing.assert_allclose(regularized_inverse(gram), np.linalg.inv(gram + lam * np.eye(8)), rtol=1e-4,
                               atol=1e-6)


@pytest.fixture()
def dtrak_store(tmp_path, tiny_ckpts, tiny_data):
    return featurize(tiny_ckpts, tiny_data.subset(slice(0, 20)), tmp_path / "d.zarr", CONFIG, progress=False,
                     allow_other_data=True)


def _phi(features: np.ndarray, norms: np.ndarray) -> np.ndarray:
    return np.einsum("ngk,ng->nk", features.astype(np.float64), norms.astype(np.float64)) / features.shape[1]


def test_dtrak_scores_equal_the_trak_formula(dtrak_store, tiny_ckpts, tiny_queries):
    store = dtrak_store
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


def test_the_kernel_is_saved_once_and_recomputed_when_the_store_changes(tmp_path, dtrak_store, tiny_ckpts,
                                                                         tiny_data, monkeypatch):
    import projidx.search.kernels as kernels

    first = store_kernel(dtrak_store, "dtrak")
    array_file, sidecar = kernel_files(dtrak_store, "dtrak")
    assert array_file.exists() and sidecar.exists()
    calls = []
    real = kernels.compute_kernel
    monkeypatch.setattr(kernels, "compute_kernel", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_array_equal(store_kernel(FeatureStore.open(dtrak_store.path), "dtrak"), first)
    assert calls == []  # read back, not recomputed
    array_file.write_bytes(b"torn")  # a damaged kernel file is recomputed, never read
    np.testing.assert_array_equal(store_kernel(dtrak_store, "dtrak"), first)
    assert calls == [1]
    # the store rebuilt at the same path from other rows: a new digest, a new kernel
    import shutil

    shutil.rmtree(dtrak_store.path.local)
    rebuilt = featurize(tiny_ckpts, tiny_data.subset(slice(20, 40)), dtrak_store.path.local, CONFIG, progress=False,
                        allow_other_data=True)
    again = store_kernel(rebuilt, "dtrak")
    assert calls == [1, 1]
    assert not np.allclose(again, first)


def test_dtrak_index_answers_like_the_exact_scan(dtrak_store, tiny_ckpts, tiny_queries):
    from projidx.search.index import build_index, load_index

    qf = featurize_queries(dtrak_store, tiny_ckpts, tiny_queries, progress=False)
    qv = query_vectors(dtrak_store, qf, "dtrak")
    build_index(dtrak_store, "dtrak")
    _, found = load_index(dtrak_store, "dtrak").search(qv, 5)
    _, exact = exact_topk(dtrak_store, qv, "dtrak", 5)
    np.testing.assert_array_equal(found, exact)
