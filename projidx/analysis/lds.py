"""The linear datamodeling score (LDS; Park et al. 2023, D-TRAK's protocol for diffusion models): the numbers, no I/O.

M random subsets (each row kept with probability-free fraction ``alpha``: exactly round(alpha N) rows) of the N
training rows are retrained on. A method's prediction of subset m's output for query q is the sum of the scores of
the subset's rows; influence means *lowering* the query's loss, so LDS(q) is the Spearman correlation over the M
subsets between that sum and minus the retrained model's loss on q. The score reported is the mean over queries,
with a bootstrap 95% interval over queries.

Shapes: masks (M, N) bool; scores (Q, N); outputs (M, Q) (each retrained model's loss on each query).

Leave-K-out (D-TRAK's and DAS's second counterfactual check): for each query, its K highest-scored rows are removed
and the model retrained; so are K seeded random rows. A method is right when removing its top-K raises the query's
loss more than removing K random rows does: the report is each query's rise (removed minus full-data loss) under
both, their paired difference with a bootstrap interval, and the share of queries where the top-K rise is larger.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from projidx.errors import ProjidxError
from projidx.seeding import derive_seed


def subset_masks(n: int, subsets: int, alpha: float, seed: int) -> np.ndarray:
    """(subsets, n) bool: each row a seeded random subset of round(alpha n) of the n rows (seeded by name, so the
    same arguments give the same subsets everywhere)."""
    if not 0 < alpha < 1:
        raise ProjidxError(f"alpha must be in (0, 1), got {alpha}")
    keep = round(alpha * n)
    if not 0 < keep < n:
        raise ProjidxError(f"alpha {alpha} of {n} rows keeps {keep}: need at least one row in and one out")
    rng = np.random.default_rng(derive_seed("lds-subsets", seed, n, subsets, str(alpha)))
    return np.stack([rng.permutation(n) < keep for _ in range(subsets)])


def lds_per_query(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation over subsets of each query's predicted output (the sum of its scores over the
    subset's rows) and minus its retrained loss; NaN where either side is constant."""
    if scores.shape[1] != masks.shape[1] or outputs.shape != (masks.shape[0], scores.shape[0]):
        raise ProjidxError(f"LDS shapes disagree: scores {scores.shape}, masks {masks.shape}, outputs"
                           f" {outputs.shape}")
    predicted = scores.astype(np.float64) @ masks.T.astype(np.float64)  # (Q, M)
    out = np.full(len(scores), np.nan)
    for q in range(len(scores)):
        if np.ptp(predicted[q]) > 0 and np.ptp(outputs[:, q]) > 0:
            out[q] = stats.spearmanr(predicted[q], -outputs[:, q]).statistic
    return out


def bootstrap_interval(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 95% bootstrap interval (percentiles 2.5 and 97.5) of the mean of ``values`` over resampled queries
    (NaNs left out)."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(derive_seed("lds-bootstrap", seed))
    means = rng.choice(finite, size=(resamples, len(finite))).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) int64 the k highest-scored rows of each query's (Q, N) ``scores``, sorted by row (a removal set; ties
    broken by the lower row)."""
    if not 0 < k < scores.shape[1]:
        raise ProjidxError(f"leave_out must be in [1, {scores.shape[1] - 1}] (rows - 1), got {k}")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1)


def random_rows(n: int, queries: int, k: int, seed: int) -> np.ndarray:
    """(queries, k) int64 k seeded random rows of n for each query, sorted by row (the baseline removal sets)."""
    if not 0 < k < n:
        raise ProjidxError(f"leave_out must be in [1, {n - 1}] (rows - 1), got {k}")
    rng = np.random.default_rng(derive_seed("leave-out-random", seed, n, queries, k))
    return np.stack([np.sort(rng.choice(n, size=k, replace=False)) for _ in range(queries)])


def leave_out_summary(rise_top: np.ndarray, rise_random: np.ndarray, seed: int = 0) -> dict:
    """The leave-K-out report of one method from each query's loss rise (Q,) when its top-K rows are removed and when
    K random rows are: their means, the mean paired difference (top minus random) with its bootstrap 95% interval,
    and the share of queries where removing the top-K raises the loss more."""
    if rise_top.shape != rise_random.shape:
        raise ProjidxError(f"leave-out shapes disagree: {rise_top.shape} vs {rise_random.shape}")
    diff = rise_top - rise_random
    return {"rise_top": float(rise_top.mean()), "rise_random": float(rise_random.mean()),
            "difference": float(diff.mean()), "difference_ci95": list(bootstrap_interval(diff, seed=seed)),
            "share_top_larger": float((diff > 0).mean()), "queries": len(diff)}
