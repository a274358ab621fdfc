"""Analysis functions on small synthetic stores with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from projidx.analysis.bias import (
    appearance_counts,
    generally_influential,
    influence_stats,
    norm_by_timestep,
    own_ranks,
    rank_agreement,
    self_influence,
    self_tracing_by_timestep,
    timestep_bias,
    unique_ratio,
)
from projidx.features.projection import ProjectorSpec
from projidx.features.query import QueryFeatures
from projidx.models.diffusion import NoiseSchedule
from projidx.search.scoring import exact_topk, query_vectors, train_vectors
from projidx.store.feature_store import Chunk, FeatureStore, StoreMeta

N, K, Q = 60, 32, 10
INFLATED = 7  # row whose gradient norm is 100x the others


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_store(path, norms: np.ndarray, timesteps: np.ndarray, features: np.ndarray) -> FeatureStore:
    meta = StoreMeta(
        projector=ProjectorSpec("sjlt", K, {"w": (K,)}), model_fingerprint="m", dataset_fingerprint="d",
        dataset_name="synthetic", n=N, image_shape=(1, 8, 8), checkpoints=[{"id": "c0", "sha256": "x", "weight": 1.0}],
        loss="mse", schedule=NoiseSchedule(), train_timesteps="replay", timesteps=[], noise_seed=0, chunk_rows=16)
    store = FeatureStore.create(path, meta, np.arange(N) + 500)
    for i in range(store.n_chunks):
        rows = store.rows(i)
        store.write_chunk("c0", i, Chunk(features[rows, None], norms[rows, None], norms[rows], timesteps[rows, None]))
    return store


@pytest.fixture()
def biased(tmp_path):
    """One training sample with an inflated gradient norm, pointing along a direction ``common`` that every
    query shares a little of (as diffusion gradients share timestep-driven components); query i is a noisy copy
    of training row 3i."""
    rng = np.random.default_rng(0)
    features = _unit(rng.normal(size=(N, K))).astype(np.float32)
    common = _unit(rng.normal(size=K))
    features = _unit(features - np.outer(features @ common, common)).astype(np.float32)  # others orthogonal to it
    features[INFLATED] = common
    norms = np.ones(N, np.float32)
    norms[INFLATED] = 100.0
    timesteps = rng.integers(0, 1000, N).astype(np.int32)
    timesteps[INFLATED] = 999
    store = synthetic_store(tmp_path / "s.zarr", norms, timesteps, features)
    q = _unit(features[3 * np.arange(Q)] + 0.15 * common + 0.05 * rng.normal(size=(Q, K))).astype(np.float32)
    queries = QueryFeatures(np.arange(Q), [500], [q[:, None]], [np.ones((Q, 1), np.float32)], [np.ones(Q, np.float32)])
    return store, queries


def test_inflated_norm_is_generally_influential_under_tracin_not_retrac(biased):
    store, queries = biased
    top = {m: exact_topk(store, query_vectors(store, queries, m), m, 5)[1] for m in ("tracin", "retrac")}
    tracin, retrac = influence_stats(top["tracin"], store), influence_stats(top["retrac"], store)
    assert (top["tracin"] == 500 + INFLATED).any(axis=1).all()  # in every TracIn list
    assert tracin["most_frequent"][0] == {"id": 500 + INFLATED, "appearances": Q}
    assert tracin["generally_influential"]["count"] >= 1
    assert retrac["generally_influential"]["count"] == 0
    assert retrac["unique_ratio"] > tracin["unique_ratio"]
    # ReTrac finds each query's source image first
    np.testing.assert_array_equal(top["retrac"][:, 0], 500 + 3 * np.arange(Q))
    # the mechanism: appearances correlate with the gradient norm under TracIn
    assert tracin["mechanism"]["c0"]["spearman_count_norm"] > 0


def test_counts_and_ratios_by_hand():
    top = np.array([[1, 2, 3], [1, 4, 5], [1, 2, 6]])
    assert unique_ratio(top) == pytest.approx(6 / 9)
    counts = appearance_counts(top, np.array([1, 2, 3, 4, 5, 6, 7]))
    assert counts.tolist() == [3, 2, 1, 1, 1, 1, 0]
    gi = generally_influential(counts, 3)
    assert gi["threshold"] == 2 and gi["count"] == 2
    assert [c["samples"] for c in gi["curve"]] == [6, 2, 1]


def test_norm_by_timestep_groups_and_ratio(tmp_path):
    t = np.repeat(np.array([10, 500, 990]), 20)
    norms = np.where(t == 10, 50.0, np.where(t == 500, 5.0, 1.0)) * np.tile(np.linspace(0.9, 1.1, 20), 3)
    table = norm_by_timestep(norms, t, 1000)
    assert [r["timestep"] for r in table] == [10, 500, 990]
    assert [r["count"] for r in table] == [20, 20, 20]
    assert table[0]["median"] / table[2]["median"] == pytest.approx(50, rel=0.1)
    # replay-like: many distinct timesteps fall into equal-width bins
    rng = np.random.default_rng(1)
    tt = rng.integers(0, 1000, 400)
    binned = norm_by_timestep(1000.0 / (tt + 1), tt, 1000, bins=10)
    assert len(binned) == 10 and binned[0]["median"] > binned[-1]["median"]
    # through a store
    features = _unit(rng.normal(size=(N, K))).astype(np.float32)
    ts = rng.integers(0, 1000, N).astype(np.int32)
    store = synthetic_store(tmp_path / "b.zarr", (2000.0 / (ts + 10)).astype(np.float32), ts, features)
    bias = timestep_bias(store)
    assert bias["checkpoints"]["c0"]["median_max_min_ratio"] > 5
    assert bias["checkpoints"]["c0"]["spearman_norm_timestep"] == pytest.approx(-1.0)


def test_self_influence_is_the_diagonal(biased):
    store, _ = biased
    rng = np.random.default_rng(2)
    own_f = _unit(rng.normal(size=(N, 3, K))).astype(np.float32)
    own_n = rng.uniform(0.5, 2, (N, 3)).astype(np.float32)
    own_m = rng.uniform(0.5, 2, N).astype(np.float32)
    own = QueryFeatures(store.ids(), [1, 2, 3], [own_f], [own_n], [own_m])
    for method in ("tracin", "retrac", "cosine"):
        full = query_vectors(store, own, method) @ np.concatenate(
            [train_vectors(store, method, i) for i in range(store.n_chunks)]).T
        np.testing.assert_allclose(self_influence(store, own, method), np.diag(full), rtol=1e-5)


def test_rank_agreement_extremes():
    rng = np.random.default_rng(3)
    exact = rng.normal(size=(4, 200))
    same = rank_agreement(exact, exact)
    assert same == {"spearman": pytest.approx(1), "kendall": pytest.approx(1), "top10_overlap": 1.0,
                    "top100_overlap": 1.0}
    rev = rank_agreement(-exact, exact)
    assert rev["spearman"] == pytest.approx(-1) and rev["top10_overlap"] == 0.0


def test_own_ranks_by_hand():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.4, 0.4, 0.4]])
    assert own_ranks(scores, np.array([0, 0, 2])).tolist() == [0, 2, 0]  # ties do not push a row down


def test_self_tracing_by_timestep_finds_the_rows_a_direction_bias_hides(tmp_path):
    """Rows replayed at t < 500 share one direction that every query leans towards; a query that is one of the
    other rows then loses to them, a query that is one of them wins (its own row matches best)."""
    rng = np.random.default_rng(4)
    common = _unit(rng.normal(size=K))
    features = _unit(rng.normal(size=(N, K)))
    features = _unit(features - np.outer(features @ common, common))
    timesteps = np.where(np.arange(N) < N // 2, 100, 900).astype(np.int32)
    early = timesteps < 500
    features[early] = _unit(features[early] + 2.0 * common)
    store = synthetic_store(tmp_path / "t.zarr", np.ones(N, np.float32), timesteps, features.astype(np.float32))
    rows = np.array([0, 1, 2, N - 3, N - 2, N - 1])
    q = _unit(features[rows] + 1.5 * common).astype(np.float32)
    own = QueryFeatures(store.ids()[rows], [500], [q[:, None]], [np.ones((len(rows), 1), np.float32)],
                        [np.ones(len(rows), np.float32)])
    table = self_tracing_by_timestep(store, own, "retrac", [0, 500, 1000])
    assert [g["timesteps"] for g in table] == [[0, 500], [500, 1000]]
    assert [g["count"] for g in table] == [3, 3]
    assert table[0]["top1"] == 1.0 and table[0]["median_rank"] == 0
    assert table[1]["top1"] == 0.0 and table[1]["median_rank"] > 0
    # the early rows lean towards every query: they score higher on average than the late ones, by the hand count
    q_all = q @ features.T.astype(np.float32)
    assert table[0]["mean_score"] == pytest.approx(q_all[:, early].mean(), rel=1e-5)
    assert table[1]["mean_score"] == pytest.approx(q_all[:, ~early].mean(), rel=1e-5)
    assert table[0]["mean_score"] > table[1]["mean_score"]
