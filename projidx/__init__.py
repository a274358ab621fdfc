"""projidx: Diffusion-TracIn / Diffusion-ReTrac training-data attribution as a random-projection index.

Data flow: data + checkpoints -> :func:`featurize` (per-sample gradients, JL projection) -> Zarr
:class:`FeatureStore` -> :func:`build_index` (FAISS, inner product = score) -> :func:`attribute`.

The names below are imported on first use (PEP 562), so ``import projidx`` and the CLI's start-up do not
import torch until something needs it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Attribution": "projidx.search.attribution",
    "attribute": "projidx.search.attribution",
    "Checkpoint": "projidx.models.checkpoints",
    "CheckpointSet": "projidx.models.checkpoints",
    "load_checkpoint_dir": "projidx.models.checkpoints",
    "load_checkpoints": "projidx.models.checkpoints",
    "save_checkpoint": "projidx.models.checkpoints",
    "ImageSet": "projidx.data.datasets",
    "from_arrays": "projidx.data.datasets",
    "load_dataset": "projidx.data.datasets",
    "DiffusersEps": "projidx.models.diffusion",
    "NoiseSchedule": "projidx.models.diffusion",
    "schedule_from_diffusers": "projidx.models.diffusion",
    "ProjidxError": "projidx.errors",
    "evaluate_lds": "projidx.reports.evaluation",
    "evaluate_memorization": "projidx.reports.evaluation",
    "FeaturizeConfig": "projidx.settings",
    "LDSConfig": "projidx.settings",
    "MemorizationConfig": "projidx.settings",
    "QueryFeatures": "projidx.features.query",
    "featurize": "projidx.features.featurization",
    "featurize_queries": "projidx.features.featurization",
    "build_index": "projidx.search.index",
    "load_index": "projidx.search.index",
    "ProjectorSpec": "projidx.features.projection",
    "make_projector": "projidx.features.projection",
    "METHODS": "projidx.search.scoring",
    "exact_scores": "projidx.search.scoring",
    "exact_topk": "projidx.search.scoring",
    "query_vectors": "projidx.search.scoring",
    "FeatureStore": "projidx.store.feature_store",
    "StoreMeta": "projidx.store.feature_store",
    "TrainConfig": "projidx.models.training",
    "train": "projidx.models.training",
    "SmallUNet": "projidx.models.unet",
    "UNetConfig": "projidx.models.unet",
    "validate_store": "projidx.reports.validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'projidx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
