"""Store-wide kernels of the TRAK family: D-TRAK's and DAS's scores as inner products an index can answer.

TRAK (Park et al. 2023) and D-TRAK (Zheng et al., ICLR 2024) score a query q against a training row x at
checkpoint c by

    phi_c(q)^T (Phi_c^T Phi_c + lambda_c I)^{-1} phi_c(x),

phi_c being the projected gradient (k,) of the attributed function (D-TRAK: the mean squared model output, a
store featurized with ``objective="dtrak"``; on a loss store the same scorer is TRAK's) and Phi_c (N, k) every
training row's. With a grid of timesteps phi is the mean over the grid of the projected gradients: the store's
``tracin`` side vector without the checkpoint weight. Checkpoints are combined as TRAK combines models: the mean
of their scores.

DAS (the Diffusion Attribution Score, Lin et al. 2024, arXiv 2410.18639) scores with the same kernel form,

    das:  phi_c(q)^T (Phi_c^T Phi_c + lambda_c I)^{-1} phi_c(x) * r_c(x),

with two differences, as the authors' code (github.com/Jinxu-Lin/DAS: ``CIFAR2/03_grad.py``, ``3_error.py``,
``07_scpre.py``) computes them:

- phi is the mean over the grid of the *unit* gradients, each timestep's full gradient L2-normalized before the
  average and the projection (P mean_t g_t / ||g_t||: the store's features averaged, ReTrac's vector), of the mean
  model output (their ``loss_function_type="mean"``: projidx's ``objective="output"``);
- r_c(x) = mean_t(e_t / ||e||), e_t = sqrt(L_c(x, t)) the root of x's per-sample MSE training loss at timestep t
  and ||e|| the norm over the timesteps of the vector e (the residual of the paper's derivation; their scorer's
  ``DAS1``). The store records L_c(x, t) (``losses``) with the features, at the gradient's own timestep and noise
  draws; a store without it cannot be scored with ``das``.

Where projidx differs from that code: the residual is taken at the store's grid (their ``3_error.py`` uses every
t in [0, T), 1000 timesteps, with per-timestep seeded noise); lambda follows the rule below, where their scorer
picks it from 27 values by the LDS being reported; their inverse is divided by the mean of its absolute entries
(one constant, which no ranking notices with one checkpoint); their ``DAS0`` variant's leverage factor
1 / (1 - h_ii)^2 is not built.

The kernel is applied to the query (:func:`projidx.search.scoring.query_vectors`), so training vectors stay as stored
and FAISS indices still answer by inner product: score = sum_c <K_c phi_c(q) / C, phi_c(x)>, the 1/C split as
1/sqrt(C) on each side.

The Gram matrices are a store-wide statistic, accumulated in float64 one row-chunk at a time (memory: C k x k,
never N x k; a store of N < k rows keeps its rows instead, C N k, and the inverse in the dual form) and saved next
to the store's indices as ``STORE.index/<method>.kernel.npz`` with a JSON sidecar
recording a digest of everything they were computed from: the store's uuid, its metadata digest, every chunk's done
record, the method and lambda. A store rebuilt, resumed with recomputed chunks or re-featurized gets a new digest,
and the kernel is recomputed instead of read.

lambda_c = ``RIDGE`` x the mean eigenvalue of Phi_c^T Phi_c (trace / k): scale-free, so one setting serves
stores whose gradients differ by orders of magnitude in norm; it keeps the inverse defined when N < k.

``matched-trak`` (beyond the papers; grid stores) keeps the timesteps apart, as ``matched`` does for cosines: one
kernel per checkpoint c and grid timestep t over the unit gradients f_{c,t} = P g_{c,t} / ||g_{c,t}|| (the store's
features), and each timestep's kernel-applied query made unit before the mean over (c, t):

    matched-trak:  mean_{c,t} < n(K_{c,t} f_{c,t}(q)), f_{c,t}(x) >,   K_{c,t} = (F_{c,t}^T F_{c,t} + lambda I)^{-1}.

D-TRAK and DAS average the gradients over the timesteps before the kernel, so the directions every training row
shares at a timestep (at large t the noise, the same for every row under shared noise, sets x_t) swamp the ones
that tell rows apart, and a timestep with a large kernel-applied query outvotes the others; per timestep the
kernel whitens those shared directions away, and the unit query gives every timestep one vote (the paper's
ReTrac normalization, taken after the kernel). Its vectors have C x K x k entries (K the grid's size), its kernel
one inverse per (c, t): "slots" below, C x K of them, where the other two methods have C.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np

from projidx.errors import ProjidxError
from projidx.features.query import mean_gradient
from projidx.store.feature_store import FeatureStore
from projidx.store.locations import Location

KERNEL_METHODS = ("dtrak", "das", "matched-trak")
RIDGE = 0.1  # lambda as a fraction of the Gram matrix's mean eigenvalue


def kernel_features(method: str, features: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """(n, S, k) float32 phi of ``method`` from unit ``features`` (n, G, k) and their exact ``norms`` (n, G), one
    (n, k) slice per kernel slot of a checkpoint: the projected mean gradient (``dtrak``, S = 1), the mean of the
    unit gradients (``das``, S = 1) or the unit gradients themselves (``matched-trak``, S = G)."""
    if method == "dtrak":
        return mean_gradient(features, norms)[:, None]
    if method == "das":
        return features.mean(axis=1, dtype=np.float32)[:, None]
    if method == "matched-trak":
        return features.astype(np.float32, copy=False)
    raise ProjidxError(f"no kernel for method {method!r}; kernel methods: {', '.join(KERNEL_METHODS)}")


def kernel_slots(method: str, gradients_per_sample: int) -> int:
    """S, the kernel slots per checkpoint of ``method`` on a store of ``gradients_per_sample`` G: G for
    ``matched-trak``, else 1."""
    return gradients_per_sample if method == "matched-trak" else 1


def das_residual(losses: np.ndarray) -> np.ndarray:
    """(n,) float32 DAS's residual factor r = mean_t(e_t / ||e||), e_t = sqrt(loss_t), of per-timestep training
    ``losses`` (n, G); a row whose losses are all zero gets 0."""
    e = np.sqrt(np.clip(losses.astype(np.float64), 0, None))
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return (e / np.where(norm > 0, norm, 1.0)).mean(axis=1).astype(np.float32)


def ridge_lambda(trace: float, k: int, ridge: float = RIDGE) -> float:
    """lambda = ``ridge`` x the mean eigenvalue trace / k of a (k, k) Gram matrix; 1 for a zero matrix."""
    lam = ridge * trace / k
    return lam if lam > 0 else 1.0


def regularized_inverse(gram: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """(k, k) float32 (G + lambda I)^{-1} of a symmetric positive semi-definite ``gram`` (k, k), lambda as
    :func:`ridge_lambda` says, through its eigendecomposition (exact for a singular G)."""
    lam = ridge_lambda(float(np.trace(gram)), gram.shape[0], ridge)
    values, vectors = np.linalg.eigh(gram)
    inverse = (vectors / (np.clip(values, 0, None) + lam)) @ vectors.T
    return inverse.astype(np.float32)


def dual_inverse(phi: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, float]:
    """(S, lambda) of fewer rows than columns, ``phi`` (n, k) with n < k: S = (Phi Phi^T + lambda I)^{-1} (n, n)
    float64 and lambda as :func:`ridge_lambda` says for Phi^T Phi, so that by the push-through identity
    (Phi^T Phi + lambda I)^{-1} = (I - Phi^T S Phi) / lambda (:class:`DualKernel`): an (n, n) inverse instead of a
    (k, k) eigendecomposition."""
    n, k = phi.shape
    lam = ridge_lambda(float(np.einsum("ij,ij->", phi, phi)), k, ridge)
    return np.linalg.inv(phi @ phi.T + lam * np.eye(n)), lam


@dataclass(frozen=True)
class DenseKernel:
    """The inverses M_s^{-1} = (Phi_s^T Phi_s + lambda_s I)^{-1} of each slot s (a checkpoint, or a checkpoint's
    timestep: :func:`kernel_slots`) kept whole: ``inverse`` (C S, k, k) float32 (stores of at least k rows)."""

    inverse: np.ndarray

    def __len__(self) -> int:
        """The number of slots C S."""
        return len(self.inverse)

    def apply(self, slot: int, q: np.ndarray) -> np.ndarray:
        """(m, k) float32 rows ``q`` (m, k) times M_slot^{-1}."""
        return q @ self.inverse[slot]


@dataclass(frozen=True)
class DualKernel:
    """The same inverses for a store of n < k rows, kept as M_s^{-1} = (I - Phi_s^T S_s Phi_s) / lambda_s
    (:func:`dual_inverse`): ``rows`` Phi (C S, n, k) float32, ``small`` S (C S, n, n) float64, ``lam`` (C S,)
    float64; n k numbers per slot instead of k^2 (a LoRA store of 300 rows at k = 32768: 39 MB, not 4.3 GB)."""

    rows: np.ndarray
    small: np.ndarray
    lam: np.ndarray

    def __len__(self) -> int:
        """The number of slots C S."""
        return len(self.rows)

    def apply(self, slot: int, q: np.ndarray) -> np.ndarray:
        """(m, k) float32 rows ``q`` (m, k) times M_slot^{-1}."""
        phi = self.rows[slot].astype(np.float64)
        q = q.astype(np.float64)
        return ((q - (q @ phi.T) @ self.small[slot] @ phi) / self.lam[slot]).astype(np.float32)


Kernel = DenseKernel | DualKernel


def kernel_query(method: str, kernel: Kernel, c: int, phi: np.ndarray, weight: float) -> np.ndarray:
    """(m, S k) float32 query vector of checkpoint ``c`` from its phi (m, S, k) (:func:`kernel_features`): slot s
    times K_{c S + s}, ``matched-trak``'s made unit, all times sqrt(``weight``) (the checkpoint's score weight,
    split between the two sides)."""
    slots = phi.shape[1]
    out = np.stack([kernel.apply(c * slots + s, phi[:, s]) for s in range(slots)], axis=1)
    if method == "matched-trak":
        norm = np.linalg.norm(out, axis=2, keepdims=True)
        out = out / np.where(norm > 0, norm, 1.0)
    return (out.reshape(len(out), -1) * np.sqrt(weight)).astype(np.float32)


def kernel_from_arrays(arrays: dict[str, np.ndarray]) -> Kernel:
    """The kernel whose fields ``arrays`` holds (as saved by :func:`store_kernel`); ValueError for other keys."""
    for form in (DenseKernel, DualKernel):
        if set(arrays) == {f.name for f in fields(form)}:
            return form(**arrays)
    raise ValueError(f"not a kernel's arrays: {sorted(arrays)}")


def kernel_digest(store: FeatureStore, method: str, ridge: float) -> str:
    """sha256 over what a kernel is computed from: the store's uuid and metadata digest, every checkpoint's done
    records (one content digest per row-chunk), the method and the ridge."""
    h = hashlib.sha256()
    h.update(json.dumps([store.uuid, dict(store.group.attrs)["projidx"].get("digest"), method, ridge]).encode())
    for cid in store.meta.checkpoint_ids:
        h.update(cid.encode())
        h.update(np.ascontiguousarray(store.records(cid), np.uint64).tobytes())
    return h.hexdigest()


def compute_kernel(store: FeatureStore, method: str, ridge: float = RIDGE) -> Kernel:
    """The regularized inverse Gram matrices of ``method``'s phi (:func:`kernel_features`), one per slot (checkpoint
    c, slot s: index c S + s), over a complete store, one row-chunk at a time: the Gram matrix accumulated in float64
    (memory k x k; one pass over the store per slot) when the store has at least k rows (:class:`DenseKernel`), else
    the rows kept (n x k < k x k) in the dual form (:class:`DualKernel`)."""
    if not store.is_complete():
        raise ProjidxError(f"store {store.path} is not completely featurized; run 'projidx featurize' first")
    k = store.meta.projector.proj_dim
    slots = kernel_slots(method, store.meta.gradients_per_sample)
    cids = store.meta.checkpoint_ids

    def phis(cid: str) -> Iterator[np.ndarray]:  # (rows, S, k) per row-chunk
        for _, chunk in store.chunks(cid):
            yield kernel_features(method, chunk.features, chunk.norms)

    if store.meta.n < k:
        rows, small, lam = [], [], []
        for cid in cids:  # one read of the checkpoint's chunks for all its slots
            phi = np.concatenate(list(phis(cid)))
            for s in range(slots):
                inverse, lam_s = dual_inverse(phi[:, s].astype(np.float64), ridge)
                rows.append(phi[:, s])
                small.append(inverse)
                lam.append(lam_s)
        return DualKernel(np.stack(rows).astype(np.float32), np.stack(small), np.array(lam))
    inverse = np.empty((len(cids) * slots, k, k), np.float32)
    for c, cid in enumerate(cids):
        for s in range(slots):  # one Gram matrix in memory at a time, one pass over the chunks each
            gram = np.zeros((k, k), np.float64)
            for phi in phis(cid):
                block = phi[:, s].astype(np.float64)
                gram += block.T @ block
            inverse[c * slots + s] = regularized_inverse(gram, ridge)
    return DenseKernel(inverse)


def kernel_files(store: FeatureStore, method: str) -> tuple[Location, Location]:
    """Where ``method``'s kernel and its sidecar live: ``STORE.index/<method>.kernel.npz`` and ``.json``."""
    folder = store.path.sibling(".index")
    return folder / f"{method}.kernel.npz", folder / f"{method}.kernel.json"


def store_kernel(store: FeatureStore, method: str, ridge: float = RIDGE) -> Kernel:
    """``method``'s kernel for ``store``: the saved one if its sidecar's digest is this store's, else
    computed and saved (file first, sidecar last; a reader that finds a sidecar without its file recomputes)."""
    if method not in KERNEL_METHODS:
        raise ProjidxError(f"no kernel for method {method!r}; kernel methods: {', '.join(KERNEL_METHODS)}")
    digest = kernel_digest(store, method, ridge)
    array_file, sidecar = kernel_files(store, method)
    try:
        recorded = json.loads(sidecar.read_text())
        if recorded.get("digest") == digest:
            data = array_file.read_bytes()
            if hashlib.sha256(data).hexdigest() == recorded.get("sha256"):
                with np.load(io.BytesIO(data), allow_pickle=False) as saved:
                    return kernel_from_arrays({name: saved[name] for name in saved.files})
    except (OSError, ValueError, KeyError):
        pass  # missing, torn or stale: recompute
    kernel = compute_kernel(store, method, ridge)
    buffer = io.BytesIO()
    np.savez(buffer, **{f.name: getattr(kernel, f.name) for f in fields(kernel)})
    try:
        with array_file.parent.staging():
            pass  # creates the local folder (object stores need none)
        array_file.write_bytes(buffer.getvalue())
        sidecar.write_text(json.dumps({"method": method, "ridge": ridge, "digest": digest,
                                       "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                                       "store_uuid": store.uuid}, indent=1))
    except OSError:
        pass  # a read-only store still answers; the kernel is recomputed next time
    return kernel
