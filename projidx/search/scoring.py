"""Diffusion-TracIn, Diffusion-ReTrac and cosine as inner products of stored vectors (METHOD.md).

Each side (training sample or query) at checkpoint c is a stack of G unit projected gradients
f_g = P g_g / ||g_g|| with exact norms ||g_g|| (G = 1 for a replayed training gradient, K on a grid,
|S| for a query). Its vector for a method is

    tracin:  sqrt(w_c) * mean_g ||g_g|| f_g          = sqrt(w_c) P mean_g g_g
    retrac:  sqrt(w_c) * mean_g f_g                  = sqrt(w_c) P mean_g n(g_g)
    cosine:  sqrt(w_c) * mean_g ||g_g|| f_g / ||mean_g g_g||
    matched: sqrt(w_c) * n( sum_g Q_{t_g} f_g )      (beyond the paper; grid stores only)
    dtrak:   sqrt(1/C) * P mean_g g_g                  (query side: times the kernel K_c, projidx.search.kernels)
    das:     sqrt(1/C) * P mean_g n(g_g) * r_c(x)      (training side; query side sqrt(1/C) K_c P mean_g n(gbar_g))
    matched-trak: [f_g / sqrt(C G)]_g, one block per grid timestep   (query side n(K_{c,g} f_g) / sqrt(C G))

and the score is the inner product of the concatenations over checkpoints:
TracIn = sum_c w_c <P mean g_train, P mean gbar_query>, and so on. With the identity projector the first
three are the paper's formulas exactly. Nothing here depends on FAISS; :func:`exact_topk` streams the store
one row-chunk at a time (memory bounded by a chunk, not by N) and is the reference for every index.

``matched`` (timestep-matched cosine) corrects the direction bias ReTrac leaves: ReTrac averages unit
gradients over t *before* the inner product, so every cross-timestep pair <n(g_t), n(gbar_t')> counts, and the
large-t directions that all samples share dominate (docs/results.md). ``matched`` compares each timestep only
with the same timestep: score = sum_c w_c mean_{t in grid} cos(g_c(x, t), gbar_c(x', t)). The training grid and
the query grid must be the same. Its dimension would grow with the grid (K x k per checkpoint); it is kept at
k by giving each timestep t its own seeded signed permutation Q_t of the k coordinates before summing over t:
<Q_t a, Q_t b> = <a, b> exactly, and each cross term <Q_t a, Q_t' b> (t != t') has mean zero and standard
deviation about 1/sqrt(k) for unit a, b, so <sum_t Q_t f_t, sum_t Q_t f'_t> / K estimates mean_t cos_t without
bias. The sum is then normalized (its expected squared norm is K), which makes every vector of equal norm
sqrt(w_c) per checkpoint: graph and quantized indices behave, and a query scores at most sum_c w_c.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from projidx.errors import ProjidxError
from projidx.features.query import QueryFeatures, mean_gradient
from projidx.search.kernels import (
    KERNEL_METHODS,
    das_residual,
    kernel_features,
    kernel_query,
    kernel_slots,
    store_kernel,
)
from projidx.seeding import generator
from projidx.settings import METHODS, SUBSET_METHODS, TIMESTEP_MATCHED
from projidx.store.feature_store import FeatureStore


def default_method(store: FeatureStore) -> str:
    """The method a look-up uses unless told otherwise: on stores of a parameter subset (a LoRA adapter, ``--params``
    other than ``all``) the first scorable of SUBSET_METHODS (``matched-trak`` on grid stores, then DAS's and D-TRAK's
    kernels), which find a fine-tune's exemplars where cosines of adapter gradients do not (docs/results.md section
    9); else ``matched`` on grid stores, which passes ``projidx validate`` best (docs/results.md); ``cosine`` on replay
    stores, where ``matched`` cannot be scored."""
    if store.meta.params and store.meta.params["patterns"] != "all":
        scorable = scorable_methods(store)
        subset = next((m for m in SUBSET_METHODS if m in scorable), None)
        if subset is not None:
            return subset
    return "matched" if store.meta.train_timesteps == "grid" else "cosine"


@functools.lru_cache(maxsize=256)
def timestep_permutation(seed: int, timestep: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The signed permutation Q_t of ``matched``: (k,) int64 target coordinates and (k,) float32 signs, drawn
    from (projection seed, timestep) so both sides of a store get the same Q_t."""
    gen = generator("matched", seed, timestep)
    perm = torch.randperm(k, generator=gen).numpy()
    signs = (torch.randint(0, 2, (k,), generator=gen) * 2 - 1).float().numpy()
    return perm, signs


def matched_vectors(features: np.ndarray, timesteps: Sequence[int], seed: int) -> np.ndarray:
    """(n, k) float32 n( sum_g Q_{t_g} f_g ) from features (n, G, k) taken at ``timesteps`` (G,); zero rows stay
    zero."""
    n, g, k = features.shape
    if len(timesteps) != g:
        raise ProjidxError(f"matched: {g} gradients per sample but {len(timesteps)} timesteps")
    out = np.zeros((n, k), np.float32)
    for j, t in enumerate(timesteps):
        perm, signs = timestep_permutation(seed, int(t), k)
        out[:, perm] += features[:, j] * signs
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norm > 0, norm, 1.0)


def side_vectors(
    method: str,
    features: np.ndarray,
    norms: np.ndarray,
    mean_norms: np.ndarray,
    weight: float,
    timesteps: Sequence[int] = (),
    seed: int = 0,
) -> np.ndarray:
    """(n, k) float32 vectors of one side at one checkpoint.

    features: (n, G, k) unit projected gradients; norms: (n, G) exact norms; mean_norms: (n,) exact norm
    of the mean gradient; weight: w_c. ``matched`` also needs the G ``timesteps`` and the projection ``seed``.
    """
    if method == "matched":
        v = matched_vectors(features, timesteps, seed)
    elif method == "retrac":
        v = features.mean(axis=1)
    elif method in KERNEL_METHODS:
        v = kernel_features(method, features, norms).reshape(len(features), -1)
    elif method in ("tracin", "cosine"):
        v = mean_gradient(features, norms)
        if method == "cosine":
            safe = np.where(mean_norms > 0, mean_norms, np.inf)
            v = v / safe[:, None]
    else:
        raise ProjidxError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return (v * math.sqrt(weight)).astype(np.float32)


def method_weights(store: FeatureStore, method: str) -> list[float]:
    """The weight of each checkpoint's score under ``method``: the TracIn weights w_c, or 1/C for the kernel methods
    (TRAK's mean over models), divided by their slots per checkpoint (``matched-trak``: a mean over (c, t))."""
    c = len(store.meta.checkpoint_ids)
    if method not in KERNEL_METHODS:
        return store.weights()
    return [1.0 / (c * kernel_slots(method, store.meta.gradients_per_sample))] * c


def vector_dim(store: FeatureStore, method: str) -> int:
    """The dimension of ``method``'s vectors on ``store``: C k, or C G k for ``matched-trak`` (a slot per timestep)."""
    slots = kernel_slots(method, store.meta.gradients_per_sample) if method in KERNEL_METHODS else 1
    return len(store.meta.checkpoint_ids) * slots * store.meta.projector.proj_dim


def train_vectors(store: FeatureStore, method: str, chunk: int) -> np.ndarray:
    """(rows, C*k) training vectors of one row-chunk: the concatenation over checkpoints. ``das`` scales each
    checkpoint's rows by their residual r_c(x) (:func:`projidx.search.kernels.das_residual`)."""
    check_method(store, method)
    parts = []
    for cid, w in zip(store.meta.checkpoint_ids, method_weights(store, method), strict=True):
        d = store.read_chunk(cid, chunk)
        v = side_vectors(method, d.features, d.norms, d.mean_norms, w, store.meta.timesteps, store.meta.projector.seed)
        parts.append(v * das_residual(d.losses)[:, None] if method == "das" else v)
    return np.concatenate(parts, axis=1)


def check_method(store: FeatureStore, method: str, query_timesteps: Sequence[int] | None = None) -> None:
    """ProjidxError unless ``method`` can be scored on ``store`` (and with queries taken at ``query_timesteps``)."""
    if method not in METHODS:
        raise ProjidxError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "das" and not store.meta.losses:
        raise ProjidxError(f"method 'das' needs the training losses (DAS's residual), which store {store.path} does"
                           " not record (written before projidx recorded them); featurize a new store for das")
    if method not in TIMESTEP_MATCHED:
        return
    if store.meta.train_timesteps != "grid":
        raise ProjidxError(f"method {method!r} needs a grid-mode store; {store.path} was featurized in"
                           f" {store.meta.train_timesteps} mode (re-featurize with --train-timesteps grid)")
    if query_timesteps is not None and list(query_timesteps) != list(store.meta.timesteps):
        raise ProjidxError(f"method {method!r} needs the queries at the store's grid {store.meta.timesteps},"
                           f" got {list(query_timesteps)} (leave --query-timesteps out)")


def scorable_methods(store: FeatureStore) -> list[str]:
    """The methods ``store`` can be scored with (``matched`` needs a grid store, ``das`` recorded training losses),
    in METHODS order."""
    out = []
    for method in METHODS:
        try:
            check_method(store, method)
        except ProjidxError:
            continue
        out.append(method)
    return out


def query_vectors(store: FeatureStore, queries: QueryFeatures, method: str) -> np.ndarray:
    """(M, C*k) query vectors, so that score = query_vectors @ train_vectors.T."""
    if queries.store_uuid is not None and queries.store_uuid != store.uuid:
        raise ProjidxError(f"these query features were made for another store than {store.path}")
    check_method(store, method, queries.timesteps)
    weights = method_weights(store, method)
    if method in KERNEL_METHODS:  # K_c phi_c(q): the kernel goes on the query side (K_c is symmetric)
        kernel = store_kernel(store, method)
        parts = [kernel_query(method, kernel, c, kernel_features(method, f, n), w)
                 for c, (f, n, w) in enumerate(zip(queries.features, queries.norms, weights, strict=True))]
    else:
        parts = [side_vectors(method, f, n, m, w, queries.timesteps, store.meta.projector.seed)
                 for f, n, m, w in zip(queries.features, queries.norms, queries.mean_norms, weights, strict=True)]
    return np.concatenate(parts, axis=1)


def chunk_vectors(store: FeatureStore, method: str, chunks: Sequence[int] | None = None,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(chunk index, (rows, d) training vectors) for ``chunks`` (default: all, in order), the next chunk read in a
    background thread while the caller works on the current one (reading and decoding overlap the matmul).
    ``transform`` (e.g. an index's sketch) is applied in that thread too."""
    order = list(range(store.n_chunks)) if chunks is None else list(chunks)

    def load(i: int) -> np.ndarray:
        v = train_vectors(store, method, i)
        return transform(v) if transform is not None else v

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, order[0]) if order else None
        for pos, i in enumerate(order):
            vectors = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(load, order[pos + 1]) if pos + 1 < len(order) else None
            yield i, vectors


def exact_scores(store: FeatureStore, qv: np.ndarray, method: str) -> np.ndarray:
    """(M, N) all scores of query vectors ``qv`` against every stored sample (small N only)."""
    q = torch.from_numpy(qv)
    cols = [q @ torch.from_numpy(v).T for _, v in chunk_vectors(store, method)]
    return torch.cat(cols, dim=1).numpy()


def exact_topk(store: FeatureStore, qv: np.ndarray, method: str, k: int, exclude_rows: np.ndarray | None = None,
               transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by streaming the store: (M, k') scores and (M, k') sample ids, best first, k' = min(k, N).

    Memory: one row-chunk (and the next one, prefetched). ``exclude_rows`` (M,): a store row each query must not
    return (leave-one-out). ``transform`` maps training vectors into the space of ``qv`` (an index's sketch)."""
    if k < 1:
        raise ProjidxError(f"top-k must be >= 1, got {k}")
    q = torch.from_numpy(qv)
    ids = torch.from_numpy(store.ids())
    best_s = torch.full((len(q), 0), -torch.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.int64)
    for i, vectors in chunk_vectors(store, method, transform=transform):
        rows = store.rows(i)
        s = q @ torch.from_numpy(vectors).T
        if exclude_rows is not None:
            mine = np.flatnonzero((exclude_rows >= rows.start) & (exclude_rows < rows.stop))
            s[mine, exclude_rows[mine] - rows.start] = -torch.inf
        cand_s = torch.cat([best_s, s], dim=1)
        cand_i = torch.cat([best_i, ids[rows].expand(len(q), -1)], dim=1)
        top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
        best_s, best_i = top.values, torch.gather(cand_i, 1, top.indices)
    return best_s.numpy(), best_i.numpy()


def rescore(store: FeatureStore, qv: np.ndarray, method: str, rows: np.ndarray) -> np.ndarray:
    """(M, R) exact scores of each query against its own R candidate store rows (``rows`` (M, R), -1 = none:
    score -inf). Reads only the row-chunks that hold a candidate, each once."""
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    valid = rows >= 0
    chunk_of = np.where(valid, rows // store.meta.chunk_rows, -1)
    for i, vectors in chunk_vectors(store, method, np.unique(chunk_of[valid])):
        m, r = np.nonzero(chunk_of == i)
        local = rows[m, r] - store.rows(i).start
        out[m, r] = (qv[m] * vectors[local]).sum(axis=1)
    return out


def source_ranks(store: FeatureStore, qv: np.ndarray, method: str, source_rows: np.ndarray) -> np.ndarray:
    """(M,) rank of each query's source row among all N stored rows under ``method``: how many other rows score
    strictly higher (0 = ranked first; ties do not count against the source). Streams the store twice, one
    row-chunk at a time. ``qv``: (M, d) query vectors; ``source_rows``: (M,) store row of each query's source."""
    q = torch.from_numpy(qv)
    own = torch.empty(len(q))
    chunk_of = source_rows // store.meta.chunk_rows
    for i in np.unique(chunk_of):
        sel = np.flatnonzero(chunk_of == i)
        tv = torch.from_numpy(train_vectors(store, method, int(i)))
        own[sel] = (q[sel] * tv[source_rows[sel] - store.rows(int(i)).start]).sum(dim=1)
    ranks = torch.zeros(len(q), dtype=torch.int64)
    for i in range(store.n_chunks):
        rows = store.rows(i)
        higher = q @ torch.from_numpy(train_vectors(store, method, i)).T > own[:, None]
        mine = np.flatnonzero(chunk_of == i)
        higher[mine, source_rows[mine] - rows.start] = False  # a row is never ranked above itself
        ranks += higher.sum(dim=1)
    return ranks.numpy()
