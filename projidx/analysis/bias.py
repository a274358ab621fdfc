"""Timestep-bias statistics, generally influential samples, self-influence and fidelity (no drawing).

The paper's mechanism: a training sample's gradient norm depends mostly on the timestep it is taken
at, TracIn scores scale with that norm, so samples replayed at large-norm timesteps appear in the
top-k of every query ("generally influential"); ReTrac's normalization removes the norm.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from projidx.features.query import QueryFeatures
from projidx.search.scoring import check_method, side_vectors
from projidx.store.feature_store import FeatureStore

REPLAY_BINS = 20


def _summary(values: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p10": float(np.percentile(values, 10)),
        "p90": float(np.percentile(values, 90)),
        "count": int(values.size),
    }


def norm_by_timestep(norms: np.ndarray, timesteps: np.ndarray, T: int, bins: int = REPLAY_BINS) -> list[dict]:
    """Distribution of gradient norms per timestep.

    norms, timesteps: same shape, any. If there are at most ``bins`` distinct timesteps (grid mode) each is
    its own group; otherwise (replay mode) timesteps are grouped into ``bins`` equal-width bins of [0, T).
    Returns one dict per non-empty group: {"timestep" (group centre), "mean", "median", "p10", "p90", "count"}.
    """
    norms, timesteps = norms.ravel(), timesteps.ravel()
    distinct = np.unique(timesteps)
    if len(distinct) <= bins:
        groups = [(float(t), timesteps == t) for t in distinct]
    else:
        edges = np.linspace(0, T, bins + 1)
        groups = [((lo + hi) / 2, (timesteps >= lo) & (timesteps < hi)) for lo, hi in zip(edges[:-1], edges[1:],
                                                                                          strict=True)]
    return [{"timestep": t, **_summary(norms[mask])} for t, mask in groups if mask.any()]


def timestep_bias(store: FeatureStore) -> dict:
    """Per checkpoint: the norm-vs-timestep table and the max/min ratio of the median norms."""
    out = {"mode": store.meta.train_timesteps, "checkpoints": {}}
    for cid in store.meta.checkpoint_ids:
        norms, times = store.norms(cid)
        table = norm_by_timestep(norms, times, store.meta.schedule.T)
        medians = np.array([row["median"] for row in table])
        out["checkpoints"][cid] = {
            "by_timestep": table,
            "median_max_min_ratio": float(medians.max() / medians.min()) if medians.min() > 0 else math.inf,
            "spearman_norm_timestep": spearman(norms.ravel(), times.ravel()),
        }
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman correlation of two 1-D arrays, or None where it is undefined (a constant input)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(stats.spearmanr(a, b).statistic)


def unique_ratio(top_ids: np.ndarray) -> float:
    """Distinct training samples in the union of the Q top-k lists over Q * k (the paper's specificity); the
    empty slot -1 an approximate index may leave is not a sample."""
    return float(len(np.setdiff1d(np.unique(top_ids), [-1])) / top_ids.size)


def appearance_counts(top_ids: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """(N,) how many of the Q top-k lists each training sample (in ``train_ids`` order) appears in."""
    row = {int(i): r for r, i in enumerate(train_ids.tolist())}
    counts = np.zeros(len(train_ids), dtype=np.int64)
    for ids in top_ids:
        for i in set(int(v) for v in ids) - {-1}:  # -1: a slot an approximate index left empty
            counts[row[i]] += 1
    return counts


def generally_influential(counts: np.ndarray, n_queries: int) -> dict:
    """Samples in the top-k of at least half the queries, and the threshold swept from 1 to Q."""
    half = math.ceil(n_queries / 2)
    curve = [{"min_queries": q, "samples": int((counts >= q).sum())} for q in range(1, n_queries + 1)]
    return {"threshold": half, "count": int((counts >= half).sum()), "curve": curve}


def influence_stats(top_ids: np.ndarray, store: FeatureStore) -> dict:
    """Specificity statistics of one method's top-k lists (Q, k) over ``store``'s training samples.

    Includes, per checkpoint, the Spearman correlation of a sample's appearance count with its stored
    gradient norm and its (first) stored timestep: the paper's mechanism shows as a positive norm correlation.
    """
    train_ids = store.ids()
    counts = appearance_counts(top_ids, train_ids)
    mechanism = {}
    for cid in store.meta.checkpoint_ids:
        norms, times = store.norms(cid)
        mechanism[cid] = {
            "spearman_count_norm": spearman(counts, norms.mean(axis=1)),
            "spearman_count_timestep": spearman(counts, times[:, 0]),  # None in grid mode (same timesteps)
        }
    order = np.argsort(-counts, kind="stable")[:20]
    return {
        "queries": int(top_ids.shape[0]),
        "top_k": int(top_ids.shape[1]),
        "unique_ratio": unique_ratio(top_ids),
        "generally_influential": generally_influential(counts, top_ids.shape[0]),
        "most_frequent": [{"id": int(train_ids[r]), "appearances": int(counts[r])} for r in order if counts[r] > 0],
        "mechanism": mechanism,
        "counts": counts.tolist(),
    }


def self_influence(store: FeatureStore, own: QueryFeatures, method: str) -> np.ndarray:
    """(N,) score of every training sample against itself as a query (``own``: the training set featurized
    as queries, in the store's row order)."""
    if not np.array_equal(own.ids, store.ids()):
        raise ValueError("self-influence needs the training set featurized as queries, in store order")
    check_method(store, method, own.timesteps)
    seed = store.meta.projector.seed
    out = np.zeros(store.meta.n)
    for cid, w, qf, qn, qm in zip(store.meta.checkpoint_ids, store.weights(), own.features, own.norms,
                                  own.mean_norms, strict=True):
        for rows, chunk in store.chunks(cid):
            u = side_vectors(method, chunk.features, chunk.norms, chunk.mean_norms, w, store.meta.timesteps, seed)
            v = side_vectors(method, qf[rows], qn[rows], qm[rows], w, own.timesteps, seed)
            out[rows] += (u * v).sum(axis=1)
    return out


def own_ranks(scores: np.ndarray, own_cols: np.ndarray) -> np.ndarray:
    """(M,) rank of each query's own column among its (M, N) ``scores``: how many columns score strictly
    higher (0 = ranked first)."""
    own = scores[np.arange(len(scores)), own_cols]
    return (scores > own[:, None]).sum(axis=1)


def self_tracing_by_timestep(store: FeatureStore, own: QueryFeatures, method: str, edges: list[int]) -> list[dict]:
    """Single-checkpoint self-tracing grouped by the replayed training timestep (replay-mode stores).

    ``own``: training images featurized as queries. At each checkpoint c alone, each query's own row is ranked
    among all N rows (:func:`own_ranks`) and filed under its replayed timestep t_x^(c); groups are
    [edges[i], edges[i+1]), pooled over checkpoints. Returns per group {"timesteps": [lo, hi), "count", "top1"
    (share ranked first), "median_rank", "mean_score"}: where ranks depend on t_x, the timestep still biases the
    method. ``mean_score`` is the mean single-checkpoint score that all N rows replayed in the group get from all
    the queries: a group that scores high for every query is generally influential because of its timestep.
    Holds one checkpoint's dense (M, N) float32 scores at a time: an evaluation tool for stores of modest N.
    """
    if store.meta.train_timesteps != "replay":
        raise ValueError("self-tracing by timestep needs a replay-mode store (one timestep per sample)")
    row = {int(i): r for r, i in enumerate(store.ids().tolist())}
    own_rows = np.array([row[int(i)] for i in own.ids])
    ranks, times = [], []
    score_sum, score_count = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    groups = list(zip(edges[:-1], edges[1:], strict=True))
    for c, (cid, w) in enumerate(zip(store.meta.checkpoint_ids, store.weights(), strict=True)):
        v = side_vectors(method, own.features[c], own.norms[c], own.mean_norms[c], w)
        scores = np.zeros((len(v), store.meta.n), np.float32)
        stamp = np.zeros(store.meta.n, np.int64)
        for rows, chunk in store.chunks(cid):
            scores[:, rows] = v @ side_vectors(method, chunk.features, chunk.norms, chunk.mean_norms, w).T
            stamp[rows] = chunk.timesteps[:, 0]
        ranks.append(own_ranks(scores, own_rows))
        times.append(stamp[own_rows])
        for g, (lo, hi) in enumerate(groups):
            cols = scores[:, (stamp >= lo) & (stamp < hi)]
            score_sum[g] += float(cols.sum(dtype=np.float64))
            score_count[g] += cols.size
    rank, t = np.concatenate(ranks), np.concatenate(times)
    out = []
    for g, (lo, hi) in enumerate(groups):
        sel = (t >= lo) & (t < hi)
        if sel.any():
            out.append({"timesteps": [lo, hi], "count": int(sel.sum()), "top1": float(np.mean(rank[sel] == 0)),
                        "median_rank": float(np.median(rank[sel])), "mean_score": score_sum[g] / score_count[g]})
    return out


def rank_agreement(approx: np.ndarray, exact: np.ndarray, ks: tuple[int, ...] = (10, 100)) -> dict:
    """Agreement of two (Q, N) score matrices, averaged over queries: Spearman, Kendall, top-k overlap."""
    out: dict[str, float] = {
        "spearman": float(np.mean([stats.spearmanr(a, e).statistic for a, e in zip(approx, exact, strict=True)])),
        "kendall": float(np.mean([stats.kendalltau(a, e).statistic for a, e in zip(approx, exact, strict=True)])),
    }
    for k in ks:
        k_eff = min(k, exact.shape[1])
        top_a = np.argsort(-approx, axis=1)[:, :k_eff]
        top_e = np.argsort(-exact, axis=1)[:, :k_eff]
        out[f"top{k}_overlap"] = float(np.mean([len(set(a) & set(e)) / k_eff for a, e in zip(top_a, top_e,
                                                                                               strict=True)]))
    return out
