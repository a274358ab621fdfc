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

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from projidx.diffusion import LOSSES, NoiseSchedule
from projidx.errors import ProjidxError, one_line
from projidx.files import atomic_path, file_sha256, write_text_atomic
from projidx.unet import SmallUNet, UNetConfig

MANIFEST = "manifest.json"
FORMAT = "projidx-checkpoints/1"
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # checkpoint ids name store arrays: no '/', no '..'


def check_blob(blob: object, cid: str, T: int) -> dict:
    """``blob`` (a loaded checkpoint file) if it holds a ``state_dict`` of tensors and, when present, replay records
    of equal length with integer timesteps in [0, T); ProjidxError naming the checkpoint otherwise."""
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise ProjidxError(f"checkpoint {cid}: the file holds no 'state_dict' dictionary")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob["state_dict"].items()):
        raise ProjidxError(f"checkpoint {cid}: 'state_dict' must map parameter names to tensors")
    if ("replay_ids" in blob) != ("replay_timesteps" in blob):
        raise ProjidxError(f"checkpoint {cid}: replay records need both 'replay_ids' and 'replay_timesteps'")
    if "replay_ids" in blob:
        ids, times = blob["replay_ids"], blob["replay_timesteps"]
        if not (isinstance(ids, torch.Tensor) and isinstance(times, torch.Tensor)) or ids.dtype.is_floating_point \
                or times.dtype.is_floating_point or ids.dim() != 1 or ids.shape != times.shape:
            raise ProjidxError(f"checkpoint {cid}: 'replay_ids' and 'replay_timesteps' must be integer tensors of"
                               " one equal length")
        if len(times) and (int(times.min()) < 0 or int(times.max()) >= T):
            raise ProjidxError(f"checkpoint {cid}: replayed timesteps must lie in [0, {T}), found"
                               f" {int(times.min())}..{int(times.max())}")
        if len(torch.unique(ids)) != len(ids):
            raise ProjidxError(f"checkpoint {cid}: 'replay_ids' has duplicate sample ids")
    return blob


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
        ids = [c.id for c in self.checkpoints]
        for c in self.checkpoints:
            if not isinstance(c.id, str) or not SAFE_ID.fullmatch(c.id):
                raise ProjidxError(f"checkpoint id {c.id!r}: use 1-128 letters, digits, '.', '_' or '-', starting"
                                   " with a letter or digit")
            if not isinstance(c.weight, float | int) or not math.isfinite(c.weight) or c.weight < 0:
                raise ProjidxError(f"checkpoint {c.id}: its TracIn weight must be a finite number >= 0,"
                                   f" got {c.weight!r}")
        if len(set(ids)) != len(ids):
            raise ProjidxError(f"checkpoint ids must be unique, got {ids}")

    def describe(self) -> list[dict]:
        return [{"id": c.id, "sha256": c.sha256, "weight": c.weight} for c in self.checkpoints]


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
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
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
    write_text_atomic(directory / MANIFEST, json.dumps({"format": FORMAT, **manifest}, indent=2))


def load_checkpoint_dir(directory: str | Path) -> CheckpointSet:
    """Read a checkpoint directory written by ``projidx train`` (or by hand in the same format)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ProjidxError(f"checkpoints {directory}: no {MANIFEST} (run 'projidx train' first)")
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict):
            raise ProjidxError(f"checkpoints {directory}: {MANIFEST} must hold a JSON object, not"
                               f" {type(m).__name__}")
        if m.get("format") != FORMAT:
            raise ProjidxError(f"checkpoints {directory}: unsupported manifest format {m.get('format')!r}")
        ckpts = []
        for c in m["checkpoints"]:
            if Path(str(c["file"])).name != c["file"] or c["file"] in ("", ".", ".."):
                raise ProjidxError(f"checkpoints {directory}: checkpoint file {c['file']!r} must be a file name in"
                                   " the directory")
            ckpts.append(Checkpoint(str(c["id"]), directory / c["file"], float(c["weight"]), str(c["sha256"])))
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
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProjidxError(f"checkpoints {directory}: malformed {MANIFEST} ({one_line(e)!r})") from e
