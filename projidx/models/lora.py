"""LoRA fine-tunes as checkpoints: one base diffusers folder (``--base``) and one folder per checkpoint holding the
UNet's adapter as diffusers saves it (``save_lora_weights``: ``pytorch_lora_weights.safetensors``).

Adapters are read and injected by diffusers' and peft's own loaders, never by parsing keys here:
``lora_state_dict`` reads a file (with the LoRA config diffusers may store beside the weights), ``load_lora_adapter``
creates the adapter's config from it, injects the layers (peft's ``inject_adapter_in_model``) into the base's UNet
and loads the weights (``set_peft_model_state_dict``). The first checkpoint's adapter is injected; every checkpoint's
weights are then swapped into those same layers (``hotswap``), after checking that its file has the first one's
tensors, shapes and config. A checkpoint's state dict is the base's weights (one copy, shared by every checkpoint)
plus its adapter's, in the adapted model's own parameter names, so everything that loads a state dict (featurize,
query, sample) works unchanged; ``--params lora`` (:func:`projidx.features.grads.select_parameters`) then attributes
the adapter alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from projidx.errors import ProjidxError, one_line
from projidx.files import file_sha256
from projidx.models.checkpoints import (
    LORA_WEIGHTS,
    Checkpoint,
    CheckpointSet,
    check_blob,
    checkpoint_folders,
    folder_ids,
    load_diffusers_folders,
    tracin_weights,
)
from projidx.models.diffusion import DiffusersEps

ADAPTER = "default"  # the adapter's name inside the model (peft's default)
COMPONENT = "unet"  # the pipeline component whose adapter is attributed (diffusers' prefix for it in the file)


def is_adapter_parameter(name: str) -> bool:
    """Whether parameter ``name`` belongs to a LoRA adapter: peft names an adapter's weights by its layers
    (``...to_q.lora_A.default.weight``, ``lora_B``, ``lora_embedding_A``, ``lora_magnitude_vector``)."""
    return any(part.startswith("lora_") for part in name.split("."))


@dataclass(frozen=True)
class AdapterFile:
    """One LoRA file as diffusers reads it: the state dict, network alphas (kohya-style files) and LoRA config."""

    state: dict[str, torch.Tensor]
    alphas: dict | None
    metadata: dict | None

    def layout(self) -> tuple:
        """What two checkpoints of one fine-tune share: tensor names and shapes, alphas and config."""
        return {k: tuple(v.shape) for k, v in self.state.items()}, self.alphas, self.metadata


def _first_problem(error: BaseException) -> str:
    """The first line of ``error`` that names a problem, not a heading (torch's ``Error(s) in loading ...:``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return one_line(ValueError(next((line for line in lines if not line.endswith(":")), str(error))))


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' log messages silenced (its loader logs, besides raising, what the errors here report in one line)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def read_adapter(folder: Path) -> AdapterFile:
    """The LoRA weights of a checkpoint folder (``pytorch_lora_weights.safetensors``), read by diffusers."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    try:
        with _quiet_diffusers():
            state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
                str(folder), weight_name=LORA_WEIGHTS, local_files_only=True, return_lora_metadata=True)
    except Exception as e:  # diffusers raises whatever its readers raise on a damaged file
        raise ProjidxError(f"checkpoints {folder}: cannot read {LORA_WEIGHTS} ({one_line(e)})") from e
    return AdapterFile(dict(state), alphas, metadata)


@functools.cache
def _with_adapter_loader(cls: type) -> type:
    """``cls`` with diffusers' ``PeftAdapterMixin`` (``load_lora_adapter``), same name, modules and weights."""
    from diffusers.loaders.peft import PeftAdapterMixin

    return type(cls.__name__, (cls, PeftAdapterMixin), {"__module__": cls.__module__})


def adapter_capable(unet: nn.Module) -> nn.Module:
    """``unet`` able to load LoRA adapters: diffusers gives ``UNet2DConditionModel`` its ``PeftAdapterMixin``; a UNet
    class without it (``UNet2DModel``) gets the mixin through a subclass of its own (the same object, re-classed)."""
    from diffusers.loaders.peft import PeftAdapterMixin

    if not isinstance(unet, PeftAdapterMixin):
        unet.__class__ = _with_adapter_loader(type(unet))
    return unet


class LoraAdapters:
    """The base model with the first checkpoint's adapter injected into its UNet; :meth:`read` makes any checkpoint's
    state dict. ``model``: the base (:class:`DiffusersEps`) with the base's weights loaded; ``first``: the first
    checkpoint folder."""

    def __init__(self, model: DiffusersEps, first: Path) -> None:
        self.model = model
        self.unet = adapter_capable(model.unet)
        adapter = read_adapter(first)
        self.layout = adapter.layout()
        try:
            self._load(adapter, hotswap=False)
        except (ValueError, RuntimeError, KeyError, TypeError) as e:  # no target layer, or shapes that differ
            raise ProjidxError(f"checkpoints {first}: its LoRA weights do not fit the base's UNet (LoRA for another"
                               f" base?): {_first_problem(e)}") from e
        fitted = len(self.adapter_state())
        if fitted != len(adapter.state):
            raise ProjidxError(f"checkpoints {first}: {fitted} of the {len(adapter.state)} tensors in {LORA_WEIGHTS}"
                               f" fit the base's UNet (LoRA for another base, or for a component besides the UNet)")
        self.frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if not is_adapter_parameter(n)}

    def _load(self, adapter: AdapterFile, hotswap: bool) -> None:
        with _quiet_diffusers():
            self.unet.load_lora_adapter(adapter.state, prefix=COMPONENT, network_alphas=adapter.alphas,
                                        metadata=adapter.metadata, adapter_name=ADAPTER, hotswap=hotswap)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """{name: tensor} the model's adapter weights now (views of its parameters)."""
        return {n: t for n, t in self.model.state_dict().items() if is_adapter_parameter(n)}

    def read(self, path: Path) -> dict:
        """``{"state_dict": ...}``: the base's weights and the adapter in ``path`` (a checkpoint's LoRA file), loaded
        into the model's adapter layers by diffusers (which keep them), then copied out."""
        adapter = read_adapter(path.parent)
        if adapter.layout() != self.layout:
            raise ProjidxError(f"checkpoints {path.parent}: its LoRA adapter's layers, ranks or config differ from"
                               " the first checkpoint's (one adapter per fine-tune)")
        self._load(adapter, hotswap=True)
        return {"state_dict": {**self.frozen, **{n: t.detach().clone() for n, t in self.adapter_state().items()}}}


def load_lora_folders(base: str | Path, folders: list[str | Path], weights: list[float] | None = None,
                      loss: str = "mse") -> CheckpointSet:
    """Checkpoints of a LoRA fine-tune: ``base`` a diffusers folder (:func:`load_diffusers_folders`: the model,
    schedule and prediction type) and ``folders`` one per checkpoint, in training order, each holding
    ``pytorch_lora_weights.safetensors``. Each checkpoint's hash is its LoRA file's, ``base_sha256`` the base
    weights'; ids are the folder names; ``weights``: TracIn weights (default 1 each)."""
    paths = checkpoint_folders(folders, weights)
    missing = [p for p in paths if not (p / LORA_WEIGHTS).is_file()]
    if missing:
        raise ProjidxError(f"checkpoints {missing[0]}: no {LORA_WEIGHTS} (LoRA weights as diffusers saves them)")
    ckpts = load_diffusers_folders([base], None, loss)
    (base_ckpt,) = ckpts.checkpoints
    ckpts.model.load_state_dict(check_blob(base_ckpt.load(), base_ckpt.id, ckpts.schedule.T)["state_dict"])
    adapters = LoraAdapters(ckpts.model, paths[0])
    files = [p / LORA_WEIGHTS for p in paths]
    lora = [Checkpoint(cid, f, w, file_sha256(f), reader=adapters.read, base_sha256=base_ckpt.sha256)
            for cid, f, w in zip(folder_ids(paths), files, tracin_weights(weights, paths), strict=True)]
    return replace(ckpts, checkpoints=lora, folders=tuple(p.resolve() for p in paths), base=Path(base).resolve())
