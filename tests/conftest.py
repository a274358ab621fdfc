"""Shared fixtures: a tiny DDPM trained once per session on a few digits (seconds on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from projidx.data.datasets import ImageSet, load_dataset
from projidx.models.checkpoints import CheckpointSet
from projidx.models.diffusion import NoiseSchedule
from projidx.models.training import TrainConfig, train
from projidx.models.unet import UNetConfig

TINY_UNET = UNetConfig(channels=1, base=8, mults=(1, 2), time_dim=16, groups=4)
TINY_TRAIN = TrainConfig(epochs=4, checkpoints=2, seed=3, loss="mse", lr=2e-3, batch_size=16,
                         schedule=NoiseSchedule("linear", 1000), unet=TINY_UNET)


@pytest.fixture(scope="session")
def tiny_data() -> ImageSet:
    """40 digits with ids 1000..1039 (non-trivial ids catch row/id mix-ups)."""
    d = load_dataset("digits").subset(slice(0, 40))
    return ImageSet("tiny-digits", d.images, d.ids + 1000)


@pytest.fixture(scope="session")
def tiny_queries() -> ImageSet:
    d = load_dataset("digits:test").subset(slice(0, 5))
    return ImageSet("tiny-queries", d.images, d.ids)


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory, tiny_data) -> Path:
    out = tmp_path_factory.mktemp("ckpts")
    train(tiny_data, out, TINY_TRAIN, progress=False)
    return out


@pytest.fixture()
def tiny_ckpts(tiny_ckpt_dir) -> CheckpointSet:
    from projidx.models.checkpoints import load_checkpoint_dir

    return load_checkpoint_dir(tiny_ckpt_dir)


def save_npz(path: Path, images: np.ndarray, ids: np.ndarray | None = None) -> Path:
    arrays = {"images": images} if ids is None else {"images": images, "ids": ids}
    np.savez(path, **arrays)
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield
