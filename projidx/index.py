"""Top-k indices over a store, built so that inner product equals a method's score.

The training vectors of :mod:`projidx.scoring` (checkpoint weights, normalization and timestep
aggregation folded in) go into a FAISS index made from an index-factory string ("Flat", "IVF256,Flat",
"HNSW32", "IVF256,PQ32", ...) with the inner-product metric. Indices live next to the store, in
``STORE.index/<method>.faiss`` with a JSON sidecar tying them to the store they came from.

Without FAISS installed, "Flat" still works: the vectors are saved as ``<method>.npy`` and searched
exactly with a torch matmul + top-k (on CPU that beats faiss-cpu's flat index). Any other factory
string then fails with a clear error. FAISS's GPU is used only when ``faiss.get_num_gpus() > 0``.

The sidecar records the index file's sha256, method, dimension, factory and the store's uuid and metadata
digest; loading checks all of them, so an index file overwritten, edited or copied over another method's is
refused. Index files and sidecars are written to a temporary name and renamed, under the store's writer lock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from projidx.errors import ProjidxError, one_line
from projidx.files import atomic_path, file_sha256, write_text_atomic
from projidx.scoring import check_method, train_vectors
from projidx.store import FeatureStore, WriterLock


def faiss_module():
    """The ``faiss`` module, or None if neither projidx[cpu] nor projidx[gpu] is installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def index_dir(store: FeatureStore) -> Path:
    return store.path.with_name(store.path.name + ".index")


@dataclass
class SearchIndex:
    """A loaded index: ``search(query_vectors (M, d), k) -> (scores (M, k), ids (M, k))``, best first;
    slots an approximate index could not fill have id -1 and score -inf."""

    method: str
    factory: str
    ids: np.ndarray  # (N,) row -> sample id
    faiss_index: object | None = None
    vectors: torch.Tensor | None = None  # torch-flat backend

    def search(self, qv: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ProjidxError(f"top-k must be >= 1, got {k}")
        k = min(k, len(self.ids))
        if self.vectors is not None:
            top = torch.topk(torch.from_numpy(qv) @ self.vectors.T, k, dim=1)
            scores, rows = top.values.numpy(), top.indices.numpy()
        else:
            scores, rows = self.faiss_index.search(np.ascontiguousarray(qv, dtype=np.float32), k)  # type: ignore[attr-defined]
        found = rows >= 0  # an approximate index returns row -1 when it finds fewer than k
        return np.where(found, scores, -np.inf), np.where(found, self.ids[np.clip(rows, 0, None)], -1)


def _all_vectors(store: FeatureStore, method: str) -> np.ndarray:
    return np.concatenate([train_vectors(store, method, i) for i in range(store.n_chunks)])


def build_index(store: FeatureStore, method: str, factory: str = "Flat") -> Path:
    """Build and save the ``method`` index of a complete store; returns the index file's path."""
    with WriterLock(store.path):
        return _build_index_locked(store, method, factory)


def _store_digest(store: FeatureStore) -> str | None:
    return dict(store.group.attrs)["projidx"].get("digest")


def _build_index_locked(store: FeatureStore, method: str, factory: str) -> Path:
    check_method(store, method)
    if not store.is_complete():
        raise ProjidxError(f"store {store.path} is not completely featurized; run 'projidx featurize' first")
    faiss = faiss_module()
    if faiss is None and factory != "Flat":
        raise ProjidxError(
            f"index factory {factory!r} needs FAISS: pip install 'projidx[cpu]' (or [gpu]); only 'Flat' works without"
        )
    dim = store.meta.projector.proj_dim * len(store.meta.checkpoints)
    index = None
    if faiss is not None:
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ProjidxError(f"invalid index factory string {factory!r} ({one_line(e)})") from e
    vectors = _all_vectors(store, method)
    out = index_dir(store)
    out.mkdir(exist_ok=True)
    if index is None:
        path, backend = out / f"{method}.npy", "torch"
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, vectors)
    else:
        try:
            if not index.is_trained:
                index.train(vectors)
            index.add(vectors)
        except RuntimeError as e:
            raise ProjidxError(f"FAISS could not build {factory!r} on {len(vectors)} vectors ({one_line(e)})") from e
        path, backend = out / f"{method}.faiss", "faiss"
        try:
            with atomic_path(path) as tmp:
                faiss.write_index(index, str(tmp))
        except RuntimeError as e:
            raise ProjidxError(f"FAISS could not write {path} ({one_line(e)})") from e
    sidecar = {"method": method, "factory": factory, "backend": backend, "store_uuid": store.uuid,
               "store_digest": _store_digest(store), "n": store.meta.n, "dim": int(vectors.shape[1]),
               "file": path.name, "sha256": file_sha256(path)}
    write_text_atomic(out / f"{method}.json", json.dumps(sidecar, indent=2))
    return path


def load_index(store: FeatureStore, method: str, nprobe: int | None = None) -> SearchIndex:
    """Load the saved ``method`` index of ``store``; refuses one built from another store."""
    sidecar = index_dir(store) / f"{method}.json"
    if not sidecar.is_file():
        raise ProjidxError(
            f"no {method} index for store {store.path}: run 'projidx index --store {store.path} --method {method}'"
            " or query with --exact"
        )
    unreadable = f"the {method} index in {sidecar.parent} is unreadable; rebuild it with 'projidx index'"
    try:
        meta = json.loads(sidecar.read_text())
        same_store = meta["store_uuid"] == store.uuid and meta["n"] == store.meta.n \
            and meta.get("store_digest") == _store_digest(store)
        path, backend, factory = sidecar.parent / meta["file"], meta["backend"], meta["factory"]
        expected = (meta["method"], int(meta["dim"]), str(meta["sha256"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ProjidxError(f"{unreadable} ({one_line(e)})") from e
    if not same_store:
        raise ProjidxError(f"the {method} index in {sidecar.parent} was built from another store; rebuild it with"
                           f" 'projidx index --store {store.path} --method {method}'")
    dim = store.meta.projector.proj_dim * len(store.meta.checkpoints)
    if expected[0] != method or expected[1] != dim or Path(meta["file"]).name != meta["file"] \
            or not path.is_file() or file_sha256(path) != expected[2]:
        raise ProjidxError(f"the {method} index file {path} is not the one its sidecar records (overwritten, edited"
                           f" or missing); rebuild it with 'projidx index --store {store.path} --method {method}'")
    ids = store.ids()
    faiss = faiss_module()
    if backend != "torch" and faiss is None:
        raise ProjidxError(f"the {method} index is a FAISS index: pip install 'projidx[cpu]' (or [gpu])")
    try:
        if backend == "torch":
            return SearchIndex(method, factory, ids, vectors=torch.from_numpy(np.load(path)))
        index = faiss.read_index(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise ProjidxError(f"{unreadable} ({one_line(e)})") from e
    if nprobe is not None:
        try:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        except RuntimeError as e:
            raise ProjidxError(f"--nprobe applies to IVF indices only, not {factory!r}") from e
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return SearchIndex(method, factory, ids, faiss_index=index)
