"""Attribution queries: featurize query images with the store's own settings, then top-k.

This is the library form of ``projidx query``: nothing about the projection, checkpoints, loss or
noise is re-specified; all of it is read from the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from projidx.data.datasets import IMAGE_SUFFIXES, DataOptions, Dataset, ImageSet, load_dataset
from projidx.errors import ProjidxError
from projidx.features.featurization import check_checkpoints, featurize_queries
from projidx.features.query import QueryFeatures
from projidx.models.checkpoints import CheckpointSet, load_checkpoint_dir, load_checkpoints, load_diffusers_folders
from projidx.models.lora import load_lora_folders
from projidx.search.index import SearchIndex, load_index
from projidx.search.scoring import check_method, exact_topk, query_vectors
from projidx.store.feature_store import FeatureStore


@dataclass
class Attribution:
    """Top-k training samples per query: ids and scores (M, k), best first."""

    method: str
    top_k: int
    query_ids: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)  # seconds: query featurization, search
    names: list[list[str]] | None = None  # (M, k) training file names, where the training data has them
    query_names: list[str] | None = None
    search: dict = field(default_factory=dict)  # how it was searched: {"exact": True} or the index's recall report

    def to_json(self) -> dict:
        queries = []
        for i, (qid, ids, sc) in enumerate(zip(self.query_ids, self.ids, self.scores, strict=True)):
            entry = {"query": i, "query_id": int(qid), "ids": [int(v) for v in ids],
                     "scores": [float(s) if np.isfinite(s) else None for s in sc]}  # None: a slot left empty
            if self.query_names is not None:
                entry["query_name"] = self.query_names[i]
            if self.names is not None:
                entry["names"] = self.names[i]
            queries.append(entry)
        return {"method": self.method, "top_k": self.top_k, "search": self.search, "timings_s": self.timings,
                "queries": queries}


def store_checkpoints(store: FeatureStore, locations: list[str | Path] | None = None,
                      base: str | Path | None = None) -> CheckpointSet:
    """The checkpoints a store was built from: read from ``locations`` and ``base`` where given (a checkpoint
    directory, diffusers folders, or a LoRA store's folders and base model, moved or copied elsewhere; refused unless
    they are the store's, :func:`check_checkpoints`), else from the directory, diffusers folders or LoRA folders and
    base recorded in the store (diffusers folders with the TracIn weights the store records)."""
    meta = store.meta
    weights = [c["weight"] for c in meta.checkpoints] if meta.checkpoint_folders else None
    if base is not None and not meta.checkpoint_base:
        raise ProjidxError(f"base {base}: store {store.path} was not built from LoRA checkpoints over a base model"
                           " (leave out --base)")
    if locations or base is not None:
        folders = list(locations) if locations else list(meta.checkpoint_folders)
        ckpts = load_checkpoints(folders, weights, base if base is not None else meta.checkpoint_base)
        where = ", ".join(str(p) for p in folders) + (f" over base {base}" if base is not None else "")
        check_checkpoints(store, ckpts, f"the checkpoints in {where} (--checkpoints, --base)")
        return ckpts
    if not meta.checkpoint_dir and not meta.checkpoint_folders:
        raise ProjidxError(f"store {store.path} records no checkpoint directory; pass the checkpoints explicitly"
                           " (--checkpoints)")
    try:
        if meta.checkpoint_base:
            return load_lora_folders(meta.checkpoint_base, meta.checkpoint_folders, weights, meta.loss)
        if meta.checkpoint_folders:
            return load_diffusers_folders(meta.checkpoint_folders, weights, meta.loss)
        return load_checkpoint_dir(meta.checkpoint_dir)
    except ProjidxError as e:
        raise ProjidxError(f"{e}; if the store's checkpoints moved, pass them (--checkpoints, and a LoRA store's"
                           " --base)") from e


def attribute(
    store: FeatureStore,
    queries: ImageSet | QueryFeatures,
    method: str,
    top_k: int = 10,
    exact: bool = False,
    ckpts: CheckpointSet | None = None,
    query_timesteps: int | None = None,
    noise_draws: int | None = None,
    progress: bool = False,
    nprobe: int | None = None,
    device: str = "cpu",
    rerank: int | None = None,
) -> Attribution:
    """Top-k training samples for each query under ``method`` (exact streaming scan or the saved index).
    ``query_timesteps`` and ``noise_draws`` default as :func:`projidx.features.featurization.query_defaults` says."""
    check_method(store, method)
    index = None if exact else load_index(store, method, nprobe=nprobe)  # fail before featurizing
    timings = {}
    query_names = list(queries.names) if isinstance(queries, ImageSet) and queries.names is not None else None
    if isinstance(queries, ImageSet):
        start = time.perf_counter()
        queries = featurize_queries(store, ckpts or store_checkpoints(store), queries, query_timesteps,
                                    noise_draws, device=device, progress=progress)
        timings["featurize_queries"] = time.perf_counter() - start
    start = time.perf_counter()
    qv = query_vectors(store, queries, method)
    if exact:
        scores, ids = exact_topk(store, qv, method, top_k)
    else:
        scores, ids = index.search(qv, top_k, rerank=rerank)
    timings["search"] = time.perf_counter() - start
    return Attribution(method, top_k, queries.ids, ids, scores, timings, query_names=query_names,
                       search=search_report(index, rerank))


def search_report(index: SearchIndex | None, rerank: int | None = None) -> dict:
    """How a look-up was answered: {"exact": True} for the exact scan, else the index's factory, its recall@10
    against the exact scan (measured when it was built) and the re-rank depth."""
    if index is None:
        return {"exact": True}
    recall = (index.sidecar or {}).get("recall") or {}
    return {"exact": False, "factory": index.factory, "recall_at_10": recall.get("recall_at_10"), "rerank": rerank}


def store_dataset(store: FeatureStore, spec: str | None = None) -> Dataset:
    """The training data a store was built from, read with the options the store records, images left on disk
    where the kind allows: from the DATA ``spec`` where given (the data moved or copied elsewhere), else by the name
    the store records; refused unless its fingerprint (one streamed pass) is the store's."""
    options = DataOptions.from_dict(store.meta.dataset_options)
    conditioning = store.meta.conditioning_inputs
    if spec is not None:
        train = load_dataset(spec, options, stream=True)
        if train.fingerprint(conditioning) != store.meta.dataset_fingerprint:
            raise ProjidxError(f"data {spec} (--train-data) is not the training data store {store.path} was built"
                               " from")
        return train
    try:
        train = load_dataset(store.meta.dataset_name, options, stream=True)
    except ProjidxError as e:
        raise ProjidxError(f"{e}; if the store's training data moved, pass it (--train-data; validate: --data)") from e
    if train.fingerprint(conditioning) != store.meta.dataset_fingerprint:
        raise ProjidxError(f"the training data {store.meta.dataset_name} changed since the store was built")
    return train


def has_file_names(store: FeatureStore, spec: str | None = None) -> bool:
    """Whether the store's training data (at ``spec`` where given) is image files, whose names results can show."""
    path = Path(spec or store.meta.dataset_name)
    return path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES


def training_images(store: FeatureStore, ids: np.ndarray, train: Dataset | None = None) -> np.ndarray:
    """(*ids.shape, C, H, W) the training images with the given sample ids (from :func:`store_dataset` unless
    ``train`` is given; only those rows are read); black for id -1."""
    train = train if train is not None else store_dataset(store)
    row = {int(i): r for r, i in enumerate(train.ids.tolist())}
    wanted = sorted({row[int(i)] for i in np.ravel(ids) if int(i) in row})
    position = {r: k for k, r in enumerate(wanted)}
    images = np.concatenate([train.subset(np.asarray(wanted, dtype=np.int64)).images.numpy(),
                             np.full((1, *train.image_shape), -1.0, np.float32)])
    # id -1 (unfilled slot): the blank image at the end
    return images[np.vectorize(lambda i: position.get(row.get(int(i), -1), -1))(ids)]
