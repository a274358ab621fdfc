"""projidx: Diffusion-TracIn / Diffusion-ReTrac training-data attribution as a random-projection index.

Data flow: data + checkpoints -> :func:`featurize` (per-sample gradients, JL projection) -> Zarr
:class:`FeatureStore` -> :func:`build_index` (FAISS, inner product = score) -> :func:`attribute`.

The names below are imported on first use (PEP 562), so ``import projidx`` and the CLI's start-up do not
import torch until something needs it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Attribution": "projidx.attribution",
    "attribute": "projidx.attribution",
    "Checkpoint": "projidx.checkpoints",
    "CheckpointSet": "projidx.checkpoints",
    "load_checkpoint_dir": "projidx.checkpoints",
    "load_checkpoints": "projidx.checkpoints",
    "save_checkpoint": "projidx.checkpoints",
    "ImageSet": "projidx.data",
    "from_arrays": "projidx.data",
    "load_dataset": "projidx.data",
    "DiffusersEps": "projidx.diffusion",
    "NoiseSchedule": "projidx.diffusion",
    "schedule_from_diffusers": "projidx.diffusion",
    "ProjidxError": "projidx.errors",
    "evaluate_lds": "projidx.evaluation",
    "evaluate_memorization": "projidx.evaluation",
    "FeaturizeConfig": "projidx.settings",
    "LDSConfig": "projidx.settings",
    "MemorizationConfig": "projidx.settings",
    "QueryFeatures": "projidx.features",
    "featurize": "projidx.featurization",
    "featurize_queries": "projidx.featurization",
    "build_index": "projidx.index",
    "load_index": "projidx.index",
    "ProjectorSpec": "projidx.projection",
    "make_projector": "projidx.projection",
    "METHODS": "projidx.scoring",
    "exact_scores": "projidx.scoring",
    "exact_topk": "projidx.scoring",
    "query_vectors": "projidx.scoring",
    "FeatureStore": "projidx.store",
    "StoreMeta": "projidx.store",
    "TrainConfig": "projidx.training",
    "train": "projidx.training",
    "SmallUNet": "projidx.unet",
    "UNetConfig": "projidx.unet",
    "validate_store": "projidx.validate",
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
