"""Diffusion-TracIn, Diffusion-ReTrac and cosine as inner products of stored vectors (METHOD.md).

Each side (training sample or query) at checkpoint c is a stack of G unit projected gradients
f_g = P g_g / ||g_g|| with exact norms ||g_g|| (G = 1 for a replayed training gradient, K on a grid,
|S| for a query). Its vector for a method is

    tracin:  sqrt(w_c) * mean_g ||g_g|| f_g          = sqrt(w_c) P mean_g g_g
    retrac:  sqrt(w_c) * mean_g f_g                  = sqrt(w_c) P mean_g n(g_g)
    cosine:  sqrt(w_c) * mean_g ||g_g|| f_g / ||mean_g g_g||

and the score is the inner product of the concatenations over checkpoints:
TracIn = sum_c w_c <P mean g_train, P mean gbar_query>, and so on. With the identity projector these
are the paper's formulas exactly. Nothing here depends on FAISS; :func:`exact_topk` streams the store
one row-chunk at a time (memory bounded by a chunk, not by N) and is the reference for every index.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from projidx.errors import ProjidxError
from projidx.featurize import QueryFeatures
from projidx.store import FeatureStore

METHODS = ("tracin", "retrac", "cosine")


def side_vectors(
    method: str, features: np.ndarray, norms: np.ndarray, mean_norms: np.ndarray, weight: float
) -> np.ndarray:
    """(n, k) float32 vectors of one side at one checkpoint.

    features: (n, G, k) unit projected gradients; norms: (n, G) exact norms; mean_norms: (n,) exact norm
    of the mean gradient; weight: w_c.
    """
    if method == "retrac":
        v = features.mean(axis=1)
    elif method in ("tracin", "cosine"):
        v = (features * norms[..., None]).mean(axis=1)
        if method == "cosine":
            safe = np.where(mean_norms > 0, mean_norms, np.inf)
            v = v / safe[:, None]
    else:
        raise ProjidxError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return (v * math.sqrt(weight)).astype(np.float32)


def train_vectors(store: FeatureStore, method: str, chunk: int) -> np.ndarray:
    """(rows, C*k) training vectors of one row-chunk: the concatenation over checkpoints."""
    parts = []
    for cid, w in zip(store.meta.checkpoint_ids, store.weights(), strict=True):
        d = store.read_chunk(cid, chunk)
        parts.append(side_vectors(method, d.features, d.norms, d.mean_norms, w))
    return np.concatenate(parts, axis=1)


def query_vectors(store: FeatureStore, queries: QueryFeatures, method: str) -> np.ndarray:
    """(M, C*k) query vectors, so that score = query_vectors @ train_vectors.T."""
    if queries.store_uuid is not None and queries.store_uuid != store.uuid:
        raise ProjidxError(f"these query features were made for another store than {store.path}")
    parts = [
        side_vectors(method, f, n, m, w)
        for f, n, m, w in zip(queries.features, queries.norms, queries.mean_norms, store.weights(), strict=True)
    ]
    return np.concatenate(parts, axis=1)


def exact_scores(store: FeatureStore, qv: np.ndarray, method: str) -> np.ndarray:
    """(M, N) all scores of query vectors ``qv`` against every stored sample (small N only)."""
    q = torch.from_numpy(qv)
    cols = [q @ torch.from_numpy(train_vectors(store, method, i)).T for i in range(store.n_chunks)]
    return torch.cat(cols, dim=1).numpy()


def exact_topk(store: FeatureStore, qv: np.ndarray, method: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by streaming the store: (M, k') scores and (M, k') sample ids, best first, k' = min(k, N)."""
    if k < 1:
        raise ProjidxError(f"top-k must be >= 1, got {k}")
    q = torch.from_numpy(qv)
    ids = torch.from_numpy(store.ids())
    best_s = torch.full((len(q), 0), -torch.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.int64)
    for i in range(store.n_chunks):
        rows = store.rows(i)
        s = q @ torch.from_numpy(train_vectors(store, method, i)).T
        cand_s = torch.cat([best_s, s], dim=1)
        cand_i = torch.cat([best_i, ids[rows].expand(len(q), -1)], dim=1)
        top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
        best_s, best_i = top.values, torch.gather(cand_i, 1, top.indices)
    return best_s.numpy(), best_i.numpy()
