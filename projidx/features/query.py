"""Query-side features: what featurization hands to scoring and analysis (plain data, no orchestration)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class QueryFeatures:
    """Query-side features for M queries at C checkpoints and |S| timesteps.

    features[c]: (M, S, k) float32 P gbar / ||gbar||; norms[c]: (M, S) ||gbar_c(x', t)||;
    mean_norms[c]: (M,) ||(1/|S|) sum_t gbar_c(x', t)||, all exact except the projection.
    """

    ids: np.ndarray
    timesteps: list[int]
    features: list[np.ndarray]
    norms: list[np.ndarray]
    mean_norms: list[np.ndarray]
    store_uuid: str | None = None  # the store whose projector made them (None: not checked)


def mean_gradient(features: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """(n, k) float32 projection of each row's mean gradient: the mean over its G gradients of unit ``features``
    (n, G, k) times their exact ``norms`` (n, G)."""
    return (features * norms[..., None]).mean(axis=1, dtype=np.float32)
