"""The linear datamodeling score (LDS; Park et al. 2023, D-TRAK's protocol for diffusion models): the numbers, no I/O.

M random subsets (each row kept with probability-free fraction ``alpha``: exactly round(alpha N) rows) of the N
training rows are retrained on. A method's prediction of subset m's output for query q is the sum of the scores of
the subset's rows; influence means *lowering* the query's loss, so LDS(q) is the Spearman correlation over the M
subsets between that sum and minus the retrained model's loss on q. The score reported is the mean over queries,
with a bootstrap 95% interval over queries.

Shapes: masks (M, N) bool; scores (Q, N); outputs (M, Q) (each retrained model's loss on each query).
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
