"""Checkpoint directories: ``manifest.json`` plus one weights-only ``.pt`` file per checkpoint.

manifest.json::

    {"format": "projidx-checkpoints/1",
     "model": {"kind": "projidx.SmallUNet" | "diffusers.UNet2DModel", "config": {...}},
     "loss": "mse" | "l1", "schedule": {"kind": ..., "T": ...}, "image_shape": [C, H, W],
     "prediction": "epsilon" | "v_prediction" (optional, epsilon),
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from projidx.errors import ProjidxError, one_line
from projidx.files import atomic_path, file_sha256, read_json_object, write_text_atomic
from projidx.models.diffusion import LOSSES, PREDICTIONS, NoiseSchedule
from projidx.models.pipeline import COMPONENTS, FrozenParts, folder_digest, load_frozen_parts
from projidx.models.unet import SmallUNet, UNetConfig

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
    """One training checkpoint: its file, its TracIn weight w_c, and its content hash.

    The file is a projidx ``.pt`` (a dict with ``state_dict`` and replay records) or a bare weights file written
    by diffusers (``.safetensors``, or a ``.bin`` state dict), whose keys get ``key_prefix`` to match the model
    (``unet.`` for the :class:`~projidx.models.diffusion.DiffusersEps` adapter). A file that is not the model's
    whole weights (a LoRA adapter, :mod:`projidx.models.lora`) has a ``reader`` that makes them of it, and the hash
    ``base_sha256`` of the weights it applies to."""

    id: str
    path: Path
    weight: float
    sha256: str
    key_prefix: str = ""
    reader: Callable[[Path], dict] | None = field(default=None, compare=False, repr=False)
    base_sha256: str | None = None

    def describe(self) -> dict:
        """What a store records of the checkpoint: id, hash, TracIn weight (and the base's hash)."""
        out = {"id": self.id, "sha256": self.sha256, "weight": self.weight}
        return out if self.base_sha256 is None else {**out, "base_sha256": self.base_sha256}

    def load(self) -> dict:
        """The checkpoint's contents (``{"state_dict": ..., ...}``), after checking its hash; raises ProjidxError
        if unreadable."""
        if not self.path.is_file():
            raise ProjidxError(f"checkpoint {self.id}: file {self.path} is missing")
        if file_sha256(self.path) != self.sha256:
            raise ProjidxError(f"checkpoint {self.id}: {self.path} does not match the hash it was recorded with")
        if self.reader is not None:
            return self.reader(self.path)
        try:
            if self.path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return {"state_dict": {self.key_prefix + k: v for k, v in load_file(self.path).items()}}
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ProjidxError(f"checkpoint {self.id}: cannot read {self.path} ({one_line(e)})") from e
        if self.path.suffix == ".bin":  # a diffusers state dict
            return {"state_dict": {self.key_prefix + k: v for k, v in blob.items()}}
        return blob


@dataclass
class CheckpointSet:
    """A model architecture and the checkpoints theta_1..theta_C of one training run.

    ``image_shape`` is the shape of the training images (C, H, W); for a pipeline with a VAE (``frozen``) the
    UNet sees their latents (:mod:`projidx.models.pipeline`). Library users with their own ``nn.Module``
    (``eps = model(x_t, t)``) build this directly; files written by :func:`save_checkpoint` hold the weights.
    """

    model: nn.Module
    checkpoints: list[Checkpoint]
    loss: str
    schedule: NoiseSchedule
    image_shape: tuple[int, int, int]
    directory: Path | None = None  # a projidx checkpoint directory (manifest.json)
    dataset: dict = field(default_factory=dict)
    prediction: str = "epsilon"  # settings.PREDICTIONS: what the model outputs
    folders: tuple[Path, ...] = ()  # diffusers folders, one per checkpoint (load_diffusers_folders)
    frozen: FrozenParts | None = None  # a latent / text-to-image pipeline's VAE and text encoder (not attributed)
    base: Path | None = None  # LoRA checkpoints: the base diffusers folder their adapters apply to (lora.py)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ProjidxError(f"unknown loss {self.loss!r} (expected one of {LOSSES})")
        if self.prediction not in PREDICTIONS:
            raise ProjidxError(f"unknown prediction type {self.prediction!r} (expected one of {PREDICTIONS})")
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
        return [c.describe() for c in self.checkpoints]


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
        from projidx.models.diffusion import DiffusersEps

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
            prediction=str(m.get("prediction", "epsilon")),
        )
    except ProjidxError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProjidxError(f"checkpoints {directory}: malformed {MANIFEST} ({one_line(e)!r})") from e


DIFFUSERS_UNETS = ("UNet2DModel", "UNet2DConditionModel")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # a LoRA checkpoint folder's file (diffusers' save_lora_weights)


def is_diffusers_folder(path: Path) -> bool:
    """A diffusers pipeline folder (``model_index.json`` + ``unet/``) or a UNet folder (``config.json``)."""
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file() \
        or (path / "config.json").is_file()


def diffusers_parts(folder: Path) -> tuple[Path, Path]:
    """(the UNet folder, the scheduler config file) of a diffusers folder: a pipeline folder written by
    ``save_pretrained`` (``unet/``, ``scheduler/scheduler_config.json``), or a UNet folder with
    ``scheduler_config.json`` in it or in a ``scheduler/`` folder beside it."""
    unet = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    for candidate in (folder / "scheduler" / "scheduler_config.json", unet / "scheduler_config.json",
                      unet.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return unet, candidate
    raise ProjidxError(f"checkpoints {folder}: no scheduler config (scheduler/scheduler_config.json or"
                       " scheduler_config.json beside the UNet's config.json); the noise schedule comes from it")


def _comparable(config: dict) -> dict:
    """A diffusers config without its bookkeeping keys (``_name_or_path``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def checkpoint_folders(folders: list[str | Path], weights: list[float] | None) -> list[Path]:
    """``folders`` as paths, after checking that there is one at least, each exists, and ``weights`` (if given)
    has one TracIn weight per folder."""
    paths = [Path(f) for f in folders]
    if not paths:
        raise ProjidxError("no checkpoints given")
    if weights is not None and len(weights) != len(paths):
        raise ProjidxError(f"checkpoint_weights: {len(weights)} weights for {len(paths)} checkpoint folders")
    missing = [p for p in paths if not p.is_dir()]
    if missing:
        raise ProjidxError(f"checkpoints {missing[0]}: no such folder")
    return paths


def folder_ids(paths: list[Path]) -> list[str]:
    """Checkpoint ids of folders: their names made safe (SAFE_ID), or ckpt-000, ckpt-001, ... where names repeat."""
    names = [re.sub(r"[^A-Za-z0-9._-]", "-", p.resolve().name).lstrip("._-")[:128] or "ckpt" for p in paths]
    return names if len(set(names)) == len(names) else [f"ckpt-{i:03d}" for i in range(len(paths))]


def tracin_weights(weights: list[float] | None, paths: list[Path]) -> list[float]:
    """The TracIn weight of each checkpoint folder: ``weights`` as floats, or 1 each."""
    return [float(w) for w in weights] if weights is not None else [1.0] * len(paths)


def load_diffusers_folders(folders: list[str | Path], weights: list[float] | None = None,
                           loss: str = "mse") -> CheckpointSet:
    """Checkpoints from diffusers folders (:func:`diffusers_parts`), one per checkpoint, in training order.

    Every folder must hold the same UNet architecture (``UNet2DModel`` or ``UNet2DConditionModel``) and the same
    scheduler; the schedule's alpha-bar comes from the scheduler itself (any beta schedule) and the prediction type
    from its ``prediction_type`` (epsilon or v_prediction; others refused). ``weights``: the TracIn weight of each
    checkpoint (default 1 each). Checkpoint ids are the folder names. ``loss``: the training loss (diffusers'
    training scripts use mse).
    """
    try:
        import diffusers
    except ImportError as e:
        raise ProjidxError("diffusers checkpoints need diffusers: pip install 'projidx[diffusers]'") from e
    from projidx.models.diffusion import DiffusersEps, prediction_from_diffusers, schedule_from_diffusers

    paths = checkpoint_folders(folders, weights)
    configs, schedulers, files = [], [], []
    for path in paths:
        unet, scheduler = diffusers_parts(path)
        configs.append(read_json_object(unet / "config.json", f"checkpoints {path}"))
        schedulers.append(read_json_object(scheduler, f"checkpoints {path}"))
        found = [unet / name for name in DIFFUSERS_WEIGHTS if (unet / name).is_file()]
        if not found:
            raise ProjidxError(f"checkpoints {path}: no weights ({' or '.join(DIFFUSERS_WEIGHTS)}) in {unet}")
        files.append(found[0])
    for path, config, sched in zip(paths[1:], configs[1:], schedulers[1:], strict=True):
        if _comparable(config) != _comparable(configs[0]):
            raise ProjidxError(f"checkpoints {path}: its UNet config differs from {paths[0]}'s (one architecture"
                               " per run)")
        if _comparable(sched) != _comparable(schedulers[0]):
            raise ProjidxError(f"checkpoints {path}: its scheduler config differs from {paths[0]}'s")
    kind = configs[0].get("_class_name")
    if kind not in DIFFUSERS_UNETS:
        raise ProjidxError(f"checkpoints {paths[0]}: the model is a {kind!r}; supported: {', '.join(DIFFUSERS_UNETS)}")
    try:
        model = DiffusersEps(getattr(diffusers, kind).from_config(configs[0]))
        scheduler_class = getattr(diffusers, str(schedulers[0].get("_class_name")), None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            scheduler_class = diffusers.DDPMScheduler
        scheduler = scheduler_class.from_config(schedulers[0])
        schedule = schedule_from_diffusers(scheduler)
        prediction = prediction_from_diffusers(schedulers[0])
    except ValueError as e:
        raise ProjidxError(f"checkpoints {paths[0]}: {one_line(e)}") from e
    size = configs[0].get("sample_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(configs[0].get("in_channels", 3)), int(h), int(w))
    width = model.conditioning.get("encoder_hidden_states", {}).get("dim")
    frozen = pipeline_parts(paths, configs[0], schedulers[0], width)
    ckpts = [Checkpoint(cid, f, w_c, file_sha256(f), "unet.")
             for cid, f, w_c in zip(folder_ids(paths), files, tracin_weights(weights, paths), strict=True)]
    return CheckpointSet(model=model, checkpoints=ckpts, loss=loss, schedule=schedule,
                         image_shape=frozen.pixel_shape(shape) if frozen and frozen.vae else shape,
                         prediction=prediction, folders=tuple(p.resolve() for p in paths), frozen=frozen)


def pipeline_parts(paths: list[Path], unet_config: dict, scheduler_config: dict,
                   cross_attention_dim: int | None) -> FrozenParts | None:
    """The frozen parts (VAE, tokenizer, text encoder) of pipeline folders (``unet/`` beside them), loaded from the
    first and required to be the same files in every other (they are not attributed: one per run); None where
    the folders hold none."""
    roots = [p for p in paths if (p / "unet" / "config.json").is_file()]
    present = [c for c in COMPONENTS if roots and (roots[0] / c).is_dir()]
    if not present:
        return None
    if len(roots) != len(paths):
        raise ProjidxError(f"checkpoints {roots[0]}: pipeline folders with {', '.join(present)} and UNet folders"
                           " mixed in one run")
    parts = load_frozen_parts(roots[0], unet_config, cross_attention_dim)
    for path in paths[1:]:
        theirs = {c: folder_digest(path / c) for c in COMPONENTS if (path / c).is_dir()}
        differ = sorted(set(theirs.items()) ^ set(parts.hashes.items()))
        if differ:
            raise ProjidxError(f"checkpoints {path}: its {differ[0][0]}/ differs from {paths[0]}'s (the VAE and the"
                               " text encoder are not attributed: every checkpoint of a run shares them)")
    parts.scheduler_config = scheduler_config
    return parts


def load_checkpoints(locations: list[str | Path], weights: list[float] | None = None,
                     base: str | Path | None = None) -> CheckpointSet:
    """What ``--checkpoints`` names: one projidx checkpoint directory (``manifest.json``), diffusers folders
    (:func:`load_diffusers_folders`, with ``weights``), or with ``base`` (``--base``, a diffusers folder) LoRA
    folders over it (:func:`projidx.models.lora.load_lora_folders`)."""
    if base is not None:
        from projidx.models.lora import load_lora_folders

        return load_lora_folders(base, locations, weights)
    paths = [Path(p) for p in locations]
    missing = [p for p in paths if not p.is_dir()]
    if missing:
        raise ProjidxError(f"checkpoints {missing[0]}: no such folder (a projidx checkpoint directory with {MANIFEST},"
                           " or diffusers folders)")
    if len(paths) == 1 and (paths[0] / MANIFEST).is_file():
        ckpts = load_checkpoint_dir(paths[0])
        if weights is not None and [float(w) for w in weights] != [c.weight for c in ckpts.checkpoints]:
            raise ProjidxError(f"checkpoints {paths[0]}: its TracIn weights come from its {MANIFEST}; leave out"
                               " --checkpoint-weights")
        return ckpts
    if all(is_diffusers_folder(p) for p in paths):
        return load_diffusers_folders(paths, weights)
    lora = next((p for p in paths if (p / LORA_WEIGHTS).is_file()), None)
    if lora is not None:
        raise ProjidxError(f"checkpoints {lora}: LoRA weights ({LORA_WEIGHTS}); name the model they fine-tune with"
                           " --base (its diffusers folder)")
    bad = next(p for p in paths if not is_diffusers_folder(p))
    raise ProjidxError(f"checkpoints {bad}: neither a projidx checkpoint directory ({MANIFEST}, from 'projidx train')"
                       " nor a diffusers folder (save_pretrained: model_index.json + unet/, or a UNet config.json)")
