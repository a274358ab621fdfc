"""projidx: Diffusion-TracIn / Diffusion-ReTrac training-data attribution as a random-projection index.

Data flow: data + checkpoints -> :func:`featurize` (per-sample gradients, JL projection) -> Zarr
:class:`FeatureStore` -> :func:`build_index` (FAISS, inner product = score) -> :func:`attribute`.
"""

from projidx.attribute import Attribution, attribute
from projidx.checkpoints import Checkpoint, CheckpointSet, load_checkpoint_dir, save_checkpoint
from projidx.data import ImageSet, from_arrays, load_dataset
from projidx.diffusion import DiffusersEps, NoiseSchedule, schedule_from_diffusers
from projidx.errors import ProjidxError
from projidx.featurize import FeaturizeConfig, QueryFeatures, featurize, featurize_queries
from projidx.index import build_index, load_index
from projidx.projection import ProjectorSpec, make_projector
from projidx.scoring import METHODS, exact_scores, exact_topk, query_vectors
from projidx.store import FeatureStore, StoreMeta
from projidx.train import TrainConfig, train
from projidx.unet import SmallUNet, UNetConfig

__all__ = [
    "METHODS",
    "Attribution",
    "Checkpoint",
    "CheckpointSet",
    "DiffusersEps",
    "FeatureStore",
    "FeaturizeConfig",
    "ImageSet",
    "NoiseSchedule",
    "ProjectorSpec",
    "ProjidxError",
    "QueryFeatures",
    "SmallUNet",
    "StoreMeta",
    "TrainConfig",
    "UNetConfig",
    "attribute",
    "build_index",
    "exact_scores",
    "exact_topk",
    "featurize",
    "featurize_queries",
    "from_arrays",
    "load_checkpoint_dir",
    "load_dataset",
    "load_index",
    "make_projector",
    "query_vectors",
    "save_checkpoint",
    "schedule_from_diffusers",
    "train",
]
