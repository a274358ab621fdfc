"""Memorization ground truth on generated images: the numbers, no I/O (``projidx evaluate memorization``).

A few training images (the *sources*) are planted as several identical copies among the training rows; a model
trained on that set memorizes them, and some of its generations reproduce one. For such a generation the expected
answer is known: a copy of its source. A generation *reproduces* a source when its pixel nearest neighbour among the
training rows is a copy of that source and lies closer than the ``quantile`` of the distances between the other
(unplanted) training images and their own nearest neighbours: well inside what counts as a near-copy in this data.

Arrays: pixels are flattened (n, D) float32 in [-1, 1]; ``source_of`` (N,) is each training row's source index
(-1: not planted); rankings are (M, k) store row numbers, best first, -1 for an empty slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from projidx.errors import ProjidxError

NEAR_COPY_QUANTILE = 0.05  # a generation closer to a source than 95% of unplanted images are to their neighbour


def planted_layout(n_base: int, sources: int, copies: int) -> np.ndarray:
    """(n_base + sources * copies,) the source index of each row of a planted training set: the ``n_base`` unplanted
    rows first (-1), then ``copies`` consecutive copies of each source."""
    if n_base < 2 or sources < 1 or copies < 1:
        raise ProjidxError(f"planting needs >= 2 base rows, >= 1 source and >= 1 copy; got {n_base}, {sources},"
                           f" {copies}")
    return np.concatenate([np.full(n_base, -1), np.repeat(np.arange(sources), copies)]).astype(np.int64)


def nearest_rows(queries: np.ndarray, rows: np.ndarray, exclude_self: bool = False,
                 block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(M,) Euclidean distance to, and (M,) index of, each query's nearest row of ``rows`` (queries (M, D), rows
    (N, D)); ``exclude_self``: queries are ``rows`` themselves and a row is never its own neighbour. Blocks of
    ``block`` queries bound memory by block x N."""
    q, r = torch.from_numpy(np.ascontiguousarray(queries, np.float32)), torch.from_numpy(np.ascontiguousarray(rows,
                                                                                                            np.float32))
    dist, idx = [], []
    for start in range(0, len(q), block):
        d = torch.cdist(q[start:start + block], r)
        if exclude_self:
            d[torch.arange(len(d)), torch.arange(start, start + len(d))] = torch.inf
        best = d.min(dim=1)
        dist.append(best.values)
        idx.append(best.indices)
    return torch.cat(dist).numpy(), torch.cat(idx).numpy()


@dataclass(frozen=True)
class Reproductions:
    """Which generations reproduce a planted source. nn_row / nn_distance: (M,) each generation's pixel nearest
    training row and its distance; source: (M,) the source it reproduces or -1; threshold: the distance below which
    a planted nearest neighbour counts (the ``quantile`` of unplanted rows' nearest-neighbour distances)."""

    nn_row: np.ndarray
    nn_distance: np.ndarray
    source: np.ndarray
    threshold: float

    @property
    def memorized(self) -> np.ndarray:
        """(M,) bool: the generation reproduces a source."""
        return self.source >= 0


def reproductions(generated: np.ndarray, train: np.ndarray, source_of: np.ndarray,
                  quantile: float = NEAR_COPY_QUANTILE) -> Reproductions:
    """The generations (M, D) that reproduce a planted source of the training rows (N, D) laid out by ``source_of``
    (N,). Unplanted rows' nearest neighbours are taken among unplanted rows (copies of one source would be each
    other's at distance 0)."""
    if not 0 < quantile < 1:
        raise ProjidxError(f"quantile must be in (0, 1), got {quantile}")
    base = np.flatnonzero(source_of < 0)
    if len(base) < 2:
        raise ProjidxError("memorization needs at least 2 unplanted training rows to set the near-copy distance")
    base_nn, _ = nearest_rows(train[base], train[base], exclude_self=True)
    threshold = float(np.quantile(base_nn, quantile))
    nn_distance, nn_row = nearest_rows(generated, train)
    source = np.where(nn_distance < threshold, source_of[nn_row], -1)
    return Reproductions(nn_row, nn_distance, source, threshold)


def copy_rank(ranked_rows: np.ndarray, source_of: np.ndarray, source: np.ndarray) -> np.ndarray:
    """(M,) position (0 = first) of the first copy of each query's ``source`` in its ranking ``ranked_rows`` (M, k),
    or k if none is there. Rows -1 (empty slots) never match."""
    valid = ranked_rows >= 0
    hit = valid & (source_of[np.where(valid, ranked_rows, 0)] == source[:, None])
    return np.where(hit.any(axis=1), hit.argmax(axis=1), ranked_rows.shape[1])


def label_agreement(ranked_rows: np.ndarray, train_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(M,) share of each ranking's rows (M, k) whose training label equals the query's ``labels`` (M,); empty slots
    count as disagreeing."""
    valid = ranked_rows >= 0
    same = valid & (train_labels[np.where(valid, ranked_rows, 0)] == labels[:, None])
    return same.mean(axis=1)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% at z = 1.96) of a share of ``hits`` out of ``n`` (n >= 1): how far a top-1
    share measured on a few memorized generations can be from the share on many."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def memorization_summary(ranked_rows: np.ndarray, truth: Reproductions, source_of: np.ndarray,
                         train_labels: np.ndarray | None = None, labels: np.ndarray | None = None) -> dict:
    """The report of one method: over generations that reproduce a source, the share with a copy of it first
    (``top1``) and in the top k (``topk``), each with its Wilson interval (``top1_interval``, ``topk_interval``),
    and the mean position of the first copy (k if absent); over the other
    generations, with labels, the mean share of the top k with the generation's label (``label_agreement``)."""
    mem = truth.memorized
    k = ranked_rows.shape[1]
    out: dict = {"memorized": int(mem.sum()), "k": k, "top1": None, "topk": None, "top1_interval": None,
                 "topk_interval": None, "mean_copy_rank": None, "label_agreement": None, "others": int((~mem).sum())}
    if mem.any():
        rank = copy_rank(ranked_rows[mem], source_of, truth.source[mem])
        out.update(top1=float(np.mean(rank == 0)), topk=float(np.mean(rank < k)), mean_copy_rank=float(rank.mean()),
                   top1_interval=wilson_interval(int((rank == 0).sum()), len(rank)),
                   topk_interval=wilson_interval(int((rank < k).sum()), len(rank)))
    if train_labels is not None and labels is not None and (~mem).any():
        out["label_agreement"] = float(label_agreement(ranked_rows[~mem], train_labels, labels[~mem]).mean())
    return out
