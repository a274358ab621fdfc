"""Top-k indices over a store, built so that inner product equals a method's score.

The training vectors of :mod:`projidx.search.scoring` (checkpoint weights, normalization and timestep aggregation folded
in) go into a FAISS index made from an index-factory string ("Flat", "IVF1024,Flat", "IVF1024,SQfp16", "HNSW32",
"IVF1024,PQ64", ...) with the inner-product metric. Indices live next to the store, in
``STORE.index/<method>.faiss`` with a JSON sidecar tying them to the store they came from; for a store on a URL
under the same URL (built in a local temporary directory, uploaded index file first and sidecar last, and read
back whole into memory).

Built in bounded memory: an index that needs training is trained on a seeded sample of rows, then filled one
row-chunk at a time, so the peak is about the index's own size plus one chunk. ``on_disk`` (IVF indices) fills
shards of the trained index, merges them into inverted lists in a file next to the index
(``<method>.<token>.ivfdata``, FAISS's ``OnDiskInvertedLists``) and memory-maps them when searching: the lists never
need to fit in RAM. ``index_dim`` d applies a second seeded JL (a count sketch) to the concatenation over
checkpoints, so the index dimension is d whatever the number of checkpoints (queries get the same sketch). Every
index gets a recall@10 report against the exact scan, stored in its sidecar; ``SearchIndex.search(rerank=R)``
re-scores R candidates exactly from the store.

Without FAISS installed, "Flat" still works: the vectors are written chunk by chunk to ``<method>.npy`` and
searched exactly with a torch matmul + top-k. Any other factory string then fails with a clear error. FAISS's GPU
is used only when ``faiss.get_num_gpus() > 0``.

The sidecar records the index file's sha256, method, dimension, factory and the store's uuid and metadata
digest; loading checks all of them, so an index file overwritten, edited or copied over another method's is
refused. An index and its sidecar are replaced as one pair: each build writes its files under new names
(``<method>.<token>.faiss``, ``.npy``, ``.ivfdata``), whole, and then the sidecar naming them (locally: a temporary
name renamed into place; on an object store: one object), under the store's writer lock. That one rename is the
switch: until it happens the old sidecar names the old files, which are still there; only then are the earlier
builds' files of that method removed. A build killed at any point leaves the previous pair usable.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import uuid as uuidlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from projidx.errors import ProjidxError, one_line
from projidx.files import atomic_path, file_sha256
from projidx.search.scoring import check_method, chunk_vectors, exact_topk, rescore, vector_dim
from projidx.seeding import generator
from projidx.settings import IndexConfig
from projidx.store.feature_store import FeatureStore, WriterLock
from projidx.store.locations import Location

RECALL_K = 10


def faiss_module():
    """The ``faiss`` module, or None if neither projidx[cpu] nor projidx[gpu] is installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def index_dir(store: FeatureStore) -> Location:
    """``STORE.index``, next to the store (under the same URL for a store on a URL)."""
    return store.path.sibling(".index")


@dataclass(frozen=True)
class Sketch:
    """The second JL of ``index_dim``: a count sketch from d_in to d_out, seeded by (projection seed, d_in, d_out).
    Inner products are preserved in expectation, with error about ||a|| ||b|| / sqrt(d_out)."""

    d_in: int
    d_out: int
    seed: int

    def __call__(self, v: np.ndarray) -> np.ndarray:
        """(n, d_out) float32 sketch of (n, d_in) vectors."""
        gen = generator("index-dim", self.seed, self.d_in, self.d_out)
        bucket = torch.randint(0, self.d_out, (self.d_in,), generator=gen)
        sign = (torch.randint(0, 2, (self.d_in,), generator=gen) * 2 - 1).float()
        out = torch.zeros((len(v), self.d_out))
        out.index_add_(1, bucket, torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) * sign)
        return out.numpy()


def store_sketch(store: FeatureStore, method: str, index_dim: int | None) -> Sketch | None:
    """The sketch of ``method``'s vectors on ``store`` down to ``index_dim`` (None: none)."""
    return None if index_dim is None else Sketch(vector_dim(store, method), index_dim, store.meta.projector.seed)


@dataclass
class SearchIndex:
    """A loaded index: ``search(query_vectors (M, C*k), k) -> (scores (M, k), ids (M, k))``, best first; slots an
    approximate index could not fill have id -1 and score -inf. With ``rerank`` R, the index proposes R candidates
    and their exact scores (from ``store``) order them."""

    method: str
    factory: str
    ids: np.ndarray  # (N,) row -> sample id
    faiss_index: object | None = None
    vectors: torch.Tensor | None = None  # torch-flat backend
    sketch: Sketch | None = None
    store: FeatureStore | None = None
    sidecar: dict | None = None

    def search_rows(self, qv: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, k) index scores and store rows (-1 where unfilled) for full-dimension query vectors ``qv``."""
        q = self.sketch(qv) if self.sketch is not None else np.ascontiguousarray(qv, dtype=np.float32)
        k = min(k, len(self.ids))
        if self.vectors is not None:
            top = torch.topk(torch.from_numpy(q) @ self.vectors.T, k, dim=1)
            return top.values.numpy(), top.indices.numpy()
        return self.faiss_index.search(q, k)  # type: ignore[attr-defined]

    def search(self, qv: np.ndarray, k: int, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ProjidxError(f"top-k must be >= 1, got {k}")
        if rerank is not None and rerank < k:
            raise ProjidxError(f"--rerank must be >= --top-k ({k}), got {rerank}")
        scores, rows = self.search_rows(qv, rerank or k)
        if rerank is not None:
            if self.store is None:
                raise ProjidxError("re-ranking needs the store the index was built from")
            scores = rescore(self.store, qv, self.method, rows)
            order = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
            scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        found = (rows >= 0) & np.isfinite(scores)  # an approximate index returns row -1 when it finds fewer than k
        return np.where(found, scores, -np.inf), np.where(found, self.ids[np.clip(rows, 0, None)], -1)


def store_digest(store: FeatureStore) -> str | None:
    """The store's metadata digest as it was opened (None for a version-1 store)."""
    return dict(store.group.attrs)["projidx"].get("digest")


def _nlist(factory: str) -> int | None:
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else None


def build_index(store: FeatureStore, method: str, factory: str | IndexConfig = "Flat") -> Location:
    """Build and save the ``method`` index of a complete store (``factory``: a factory string or an
    :class:`IndexConfig`); returns where the index file is."""
    config = factory if isinstance(factory, IndexConfig) else IndexConfig(factory=factory)
    with WriterLock(store.path):
        return _build_locked(store, method, config)


def _build_locked(store: FeatureStore, method: str, config: IndexConfig) -> Location:
    check_method(store, method)
    if not store.is_complete():
        raise ProjidxError(f"store {store.path} is not completely featurized; run 'projidx featurize' first")
    faiss = faiss_module()
    if faiss is None and config.factory != "Flat":
        raise ProjidxError(f"index factory {config.factory!r} needs FAISS: pip install 'projidx[cpu]' (or [gpu]);"
                           " only 'Flat' works without")
    if config.on_disk and _nlist(config.factory) is None:
        raise ProjidxError(f"--on-disk needs an IVF index, not {config.factory!r}")
    target = index_dir(store)
    if config.on_disk and target.local is None:
        raise ProjidxError(f"--on-disk needs a store on the local file system (its lists are memory-mapped), not"
                           f" {store.path}")
    sketch = store_sketch(store, method, config.index_dim)
    dim = config.index_dim or vector_dim(store, method)
    token = uuidlib.uuid4().hex[:12]  # this build's files: new names, so the previous pair stays whole
    with target.staging() as out:
        lists = None
        if faiss is None:
            path = _build_torch_flat(store, method, sketch, dim, out / f"{method}.{token}.npy")
        else:
            path, lists = _build_faiss(faiss, store, method, config, sketch, dim, out / f"{method}.{token}.faiss")
        sidecar = {"method": method, "factory": config.factory, "backend": "torch" if faiss is None else "faiss",
                   "store_uuid": store.uuid, "store_digest": store_digest(store), "n": store.meta.n, "dim": dim,
                   "file": path.name, "sha256": file_sha256(path), "config": asdict(config)}
        if lists is not None:
            sidecar["lists_file"], sidecar["lists_sha256"] = lists.name, file_sha256(lists)
        index = _open(faiss, store, method, sidecar, path, config.nprobe)
        sidecar["recall"] = recall_report(store, index, config.recall_queries, config.seed)
        target.commit(path)
    (target / f"{method}.json").write_text(json.dumps(sidecar, indent=2))  # the switch: it names the new files
    keep = {f"{method}.json", path.name} | ({lists.name} if lists is not None else set())
    for old in target.glob(f"{method}.*"):  # files of earlier (or interrupted) builds of this method
        if old.name not in keep:
            old.unlink()
    return target / path.name


def _build_torch_flat(store: FeatureStore, method: str, sketch: Sketch | None, dim: int, path: Path) -> Path:
    """The exact torch backend: the vectors written chunk by chunk into a memory-mapped .npy."""
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(store.meta.n, dim))
        for i, vectors in chunk_vectors(store, method, transform=sketch):
            out[store.rows(i)] = vectors
        out.flush()
        del out
    return path


def _training_sample(store: FeatureStore, method: str, rows: int, seed: int, sketch: Sketch | None) -> np.ndarray:
    """(min(rows, N), d) vectors of a seeded sample of store rows, reading only the chunks that hold them."""
    picked = np.sort(np.random.default_rng(seed).choice(store.meta.n, size=min(rows, store.meta.n), replace=False))
    chunk_of = picked // store.meta.chunk_rows
    parts = [vectors[picked[chunk_of == i] - store.rows(i).start]
             for i, vectors in chunk_vectors(store, method, np.unique(chunk_of), transform=sketch)]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _build_faiss(faiss, store: FeatureStore, method: str, config: IndexConfig, sketch: Sketch | None, dim: int,
                 path: Path) -> tuple[Path, Path | None]:
    """The index file ``path`` (and the on-disk inverted lists file, if any) of a FAISS index filled chunk by
    chunk."""
    try:
        index = faiss.index_factory(dim, config.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ProjidxError(f"invalid index factory string {config.factory!r} ({one_line(e)})") from e
    try:
        if not index.is_trained:
            index.train(_training_sample(store, method, config.train_rows, config.seed, sketch))
        if config.on_disk:
            return path, _fill_on_disk(faiss, index, store, method, sketch, path)
        _reserve_lists(faiss, index, store, method, sketch)
        for _, vectors in chunk_vectors(store, method, transform=sketch):
            index.add(vectors)
    except RuntimeError as e:
        raise ProjidxError(f"FAISS could not build {config.factory!r} on {store.meta.n} vectors"
                           f" ({one_line(e)})") from e
    _write(faiss, index, path)
    return path, None


def _reserve_lists(faiss, index, store: FeatureStore, method: str, sketch: Sketch | None) -> None:
    """Size every inverted list of an empty trained IVF index to its final length before filling it (one extra
    pass that assigns each vector to its list): lists filled one chunk at a time otherwise grow by doubling and can
    hold up to twice the index's size at once. Indices without IVF lists, or with a transform before the IVF
    (whose assignment happens in the transformed space), are filled as they are."""
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists):
        return
    counts = np.zeros(ivf.nlist, np.int64)
    for _, vectors in chunk_vectors(store, method, transform=sketch):
        counts += np.bincount(ivf.quantizer.search(vectors, 1)[1].ravel(), minlength=ivf.nlist)
    for list_no, count in enumerate(counts.tolist()):
        lists.resize(list_no, count)  # allocates the final capacity ...
        lists.resize(list_no, 0)  # ... and keeps it: filling the list then never reallocates


def _write(faiss, index, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
    except RuntimeError as e:
        raise ProjidxError(f"FAISS could not write {path} ({one_line(e)})") from e


SHARD_ROWS = 65_536  # rows per shard when merging into on-disk inverted lists


def _fill_on_disk(faiss, trained, store: FeatureStore, method: str, sketch: Sketch | None, path: Path) -> Path:
    """Fill shards of the trained empty IVF index (about SHARD_ROWS rows each, in a temporary directory), merge
    their inverted lists into a new ``<method>.<token>.ivfdata`` (FAISS's ``merge_ondisk``) and write the index
    that memory-maps them. Returns the lists file (a new name each build: a reader never sees a partial one)."""
    from faiss.contrib.ondisk import merge_ondisk

    lists = path.with_suffix(".ivfdata")  # path's name carries the build's token
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        shards, shard, filled = [], faiss.clone_index(trained), 0
        for i, vectors in chunk_vectors(store, method, transform=sketch):
            shard.add_with_ids(vectors, np.arange(store.rows(i).start, store.rows(i).stop, dtype=np.int64))
            filled += len(vectors)
            if filled >= SHARD_ROWS or i == store.n_chunks - 1:
                shards.append(str(Path(tmp) / f"shard{len(shards)}.faiss"))
                faiss.write_index(shard, shards[-1])
                shard, filled = faiss.clone_index(trained), 0
        final = faiss.clone_index(trained)
        merge_ondisk(final, shards, str(lists))
        _write(faiss, final, path)
    return lists


def recall_report(store: FeatureStore, index: SearchIndex, queries: int, seed: int) -> dict:
    """recall@10 of ``index`` against the exact scan of the full vectors: a seeded sample of store rows is used
    as queries, each query's own row left out of both lists (attribution queries are near, not equal to, training
    images). A returned row counts when its exact score reaches the exact 10th best (up to float rounding): rows
    tied with it, such as identical copies of one image, are all right answers, whichever of them an index
    returns. Returns {"recall_at_10", "queries", "k", "nprobe"}."""
    rows = np.sort(np.random.default_rng(seed + 1).choice(store.meta.n, size=min(queries, store.meta.n),
                                                          replace=False))
    chunk_of = rows // store.meta.chunk_rows
    qv = np.concatenate([vectors[rows[chunk_of == i] - store.rows(i).start]
                         for i, vectors in chunk_vectors(store, index.method, np.unique(chunk_of))])
    k = min(RECALL_K, store.meta.n - 1)
    if k < 1:
        return {"recall_at_10": None, "queries": 0, "k": 0}
    exact, _ = exact_topk(store, qv, index.method, k, exclude_rows=rows)
    _, found = index.search_rows(qv, k + 1)
    found = np.where(found == rows[:, None], -1, found)  # the query's own row is no answer
    scores = rescore(store, qv, index.method, found)  # -inf for empty slots
    tolerance = 1e-5 * np.maximum(np.abs(exact[:, -1:]), 1e-12)
    hits = np.minimum((scores >= exact[:, -1:] - tolerance).sum(axis=1), k)
    nprobe = None
    if index.faiss_index is not None and _nlist(index.factory) is not None:
        nprobe = int(faiss_module().extract_index_ivf(index.faiss_index).nprobe)
    return {"recall_at_10": float(np.mean(hits)) / k, "queries": len(rows), "k": k, "nprobe": nprobe}


def read_sidecar(store: FeatureStore, method: str, digest: bool = True) -> tuple[dict, Location]:
    """The ``method`` index's sidecar and where its index file is, checked against the store and (``digest``) the
    files' sha256 (:func:`load_index` checks the index file's on the bytes it loads instead)."""
    sidecar = index_dir(store) / f"{method}.json"
    if not sidecar.is_file():
        raise ProjidxError(
            f"no {method} index for store {store.path}: run 'projidx index --store {store.path} --method {method}'"
            " or query with --exact"
        )
    rebuild = _rebuild(store, method)
    try:
        meta = json.loads(sidecar.read_text())
        same_store = meta["store_uuid"] == store.uuid and meta["n"] == store.meta.n \
            and meta.get("store_digest") == store_digest(store)
        path = index_dir(store) / meta["file"]
        config = meta.get("config", {})
        expected_dim = config.get("index_dim") or vector_dim(store, method)
        sound = meta["method"] == method and int(meta["dim"]) == expected_dim \
            and Path(meta["file"]).name == meta["file"] and path.is_file() \
            and (not digest or path.sha256() == meta["sha256"])
        if sound and meta.get("lists_file"):
            lists = index_dir(store) / meta["lists_file"]
            sound = Path(meta["lists_file"]).name == meta["lists_file"] and lists.is_file() \
                and (not digest or lists.sha256() == meta["lists_sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise ProjidxError(f"the {method} index in {index_dir(store)} is unreadable ({one_line(e)}); {rebuild}") from e
    if not same_store:
        raise ProjidxError(f"the {method} index in {index_dir(store)} was built from another store; {rebuild}")
    if not sound:
        raise _not_recorded(store, method, path)
    return meta, path


def _rebuild(store: FeatureStore, method: str) -> str:
    return f"rebuild it with 'projidx index --store {store.path} --method {method}'"


def _not_recorded(store: FeatureStore, method: str, path: Location) -> ProjidxError:
    return ProjidxError(f"the {method} index file {path} is not the one its sidecar records (overwritten, edited or"
                        f" missing); {_rebuild(store, method)}")


def _contents(store: FeatureStore, method: str, meta: dict, path: Location) -> Path | bytes:
    """The index file to load, checked against the sidecar's sha256: its local path, or (on an object store) its
    bytes, read once."""
    if path.local is not None:
        if file_sha256(path.local) != meta["sha256"]:
            raise _not_recorded(store, method, path)
        return path.local
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise _not_recorded(store, method, path)
    return data


def _open(faiss, store: FeatureStore, method: str, meta: dict, source: Path | bytes, nprobe: int | None,
          where: Location | None = None) -> SearchIndex:
    """The index loaded from ``source``: a local file, or an index file's bytes (``where`` names it in errors)."""
    ids = store.ids()
    sketch = store_sketch(store, method, meta.get("config", {}).get("index_dim"))
    unreadable = f"the {method} index {where or source} is unreadable; rebuild it with 'projidx index'"
    if meta["backend"] != "torch" and faiss is None:
        raise ProjidxError(f"the {method} index is a FAISS index: pip install 'projidx[cpu]' (or [gpu])")
    try:
        if meta["backend"] == "torch":
            with warnings.catch_warnings():  # a read-only memory map: torch only reads it
                warnings.simplefilter("ignore", UserWarning)
                array = np.load(source, mmap_mode="r") if isinstance(source, Path) else np.load(io.BytesIO(source))
                vectors = torch.from_numpy(array)
            return SearchIndex(method, meta["factory"], ids, vectors=vectors, sketch=sketch, store=store,
                               sidecar=meta)
        # on-disk inverted lists are memory-mapped by FAISS itself
        index = faiss.read_index(str(source)) if isinstance(source, Path) \
            else faiss.deserialize_index(np.frombuffer(source, dtype=np.uint8))
    except (OSError, ValueError, RuntimeError) as e:
        raise ProjidxError(f"{unreadable} ({one_line(e)})") from e
    nprobe = nprobe if nprobe is not None else meta.get("config", {}).get("nprobe")
    if nprobe is not None:
        try:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        except RuntimeError as e:
            raise ProjidxError(f"--nprobe applies to IVF indices only, not {meta['factory']!r}") from e
    if faiss.get_num_gpus() > 0 and not meta.get("lists_file"):
        index = faiss.index_cpu_to_all_gpus(index)
    return SearchIndex(method, meta["factory"], ids, faiss_index=index, sketch=sketch, store=store, sidecar=meta)


def load_index(store: FeatureStore, method: str, nprobe: int | None = None) -> SearchIndex:
    """Load the saved ``method`` index of ``store``; refuses one built from another store or whose files are not
    the ones its sidecar records."""
    meta, path = read_sidecar(store, method, digest=False)
    return _open(faiss_module(), store, method, meta, _contents(store, method, meta, path), nprobe, path)
