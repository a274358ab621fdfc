"""Checkpoint directories: ``manifest.json`` plus one weights-only ``.pt`` file per checkpoint.

manifest.json::

    {"format": "projidx-checkpoints/1",
     "model": {"kind": "projidx.SmallUNet" | "diffusers.UNet2DModel", "config": {...}},
     "loss": "mse" | "l1", "schedule": {"kind": ..., "T": ...}, "image_shape": [C, H, W],
     "dataset": {"name": ..., "fingerprint": ...}, "training": {...},
     "checkpoints": [{"id": "ckpt-000", "file": "ckpt-000.pt", "epoch": e, "step": s,
                      "lr": lr, "weight": w, "sha256": ...}, ...]}

``weight`` is the TracIn step size w_c = learning rate x optimizer steps since the previous checkpoint.
Each ``.pt`` holds only tensors: ``state_dict`` and, for replay mode, ``replay_ids`` / ``replay_timesteps``
(N,) int64, the timestep each sample was drawn at in the epoch that ended at the checkpoint. Files load
with ``torch.load(weights_only=True)``: nothing is unpickled but tensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from projidx.diffusion import LOSSES, NoiseSchedule
from projidx.errors import ProjidxError, one_line
from projidx.unet import SmallUNet, UNetConfig

MANIFEST = "manifest.json"
FORMAT = "projidx-checkpoints/1"


@dataclass(frozen=True)
class Checkpoint:
    """One training checkpoint: its file, its TracIn weight w_c, and its content hash."""

    id: str
    path: Path
    weight: float
    sha256: str

    def load(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, after checking its hash; raises ProjidxError if unreadable."""
        if not self.path.is_file():
            raise ProjidxError(f"checkpoint {self.id}: file {self.path} is missing")
        if file_sha256(self.path) != self.sha256:
            raise ProjidxError(f"checkpoint {self.id}: {self.path} does not match the hash in the manifest")
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ProjidxError(f"checkpoint {self.id}: cannot read {self.path} ({one_line(e)})") from e


@dataclass
class CheckpointSet:
    """A model architecture and the checkpoints theta_1..theta_C of one training run.

    Library users with their own ``nn.Module`` (``eps = model(x_t, t)``) build this directly; files
    written by :func:`save_checkpoint` hold the weights.
    """

    model: nn.Module
    checkpoints: list[Checkpoint]
    loss: str
    schedule: NoiseSchedule
    image_shape: tuple[int, int, int]
    directory: Path | None = None
    dataset: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ProjidxError(f"unknown loss {self.loss!r} (expected one of {LOSSES})")
        if not self.checkpoints:
            raise ProjidxError("no checkpoints given")

    def describe(self) -> list[dict]:
        return [{"id": c.id, "sha256": c.sha256, "weight": c.weight} for c in self.checkpoints]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    path: Path,
    model: nn.Module,
    replay_ids: torch.Tensor | None = None,
    replay_timesteps: torch.Tensor | None = None,
) -> str:
    """Write a weights-only checkpoint file; returns its sha256."""
    blob: dict[str, object] = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if replay_ids is not None and replay_timesteps is not None:
        blob["replay_ids"] = replay_ids.to(torch.int64).cpu()
        blob["replay_timesteps"] = replay_timesteps.to(torch.int64).cpu()
    torch.save(blob, path)
    return file_sha256(path)


def build_model(spec: dict) -> nn.Module:
    """The architecture named in a manifest's ``model`` entry, with fresh weights."""
    kind = spec.get("kind")
    if kind == "projidx.SmallUNet":
        return SmallUNet(UNetConfig.from_dict(spec["config"]))
    if kind == "diffusers.UNet2DModel":
        try:
            from diffusers import UNet2DModel
        except ImportError as e:
            raise ProjidxError("this checkpoint needs diffusers: pip install 'projidx[diffusers]'") from e
        from projidx.diffusion import DiffusersEps

        return DiffusersEps(UNet2DModel.from_config(spec["config"]))
    raise ProjidxError(f"unknown model kind {kind!r} in the manifest")


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, **manifest}, indent=2))


def load_checkpoint_dir(directory: str | Path) -> CheckpointSet:
    """Read a checkpoint directory written by ``projidx train`` (or by hand in the same format)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ProjidxError(f"checkpoints {directory}: no {MANIFEST} (run 'projidx train' first)")
    try:
        m = json.loads(path.read_text())
        if m.get("format") != FORMAT:
            raise ProjidxError(f"checkpoints {directory}: unsupported manifest format {m.get('format')!r}")
        ckpts = [
            Checkpoint(str(c["id"]), directory / c["file"], float(c["weight"]), str(c["sha256"]))
            for c in m["checkpoints"]
        ]
        return CheckpointSet(
            model=build_model(m["model"]),
            checkpoints=ckpts,
            loss=str(m["loss"]),
            schedule=NoiseSchedule.from_dict(m["schedule"]),
            image_shape=tuple(int(s) for s in m["image_shape"]),  # type: ignore[arg-type]
            directory=directory,
            dataset=dict(m.get("dataset", {})),
        )
    except ProjidxError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ProjidxError(f"checkpoints {directory}: malformed {MANIFEST} ({e!r})") from e
