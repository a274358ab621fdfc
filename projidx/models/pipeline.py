"""The frozen parts of a latent text-to-image pipeline (Stable-Diffusion-style ``save_pretrained`` folders): the VAE
that maps images to the latents the UNet denoises, and the tokenizer and text encoder that map captions to its
cross-attention states. projidx runs them and never differentiates them: only the UNet is attributed, so a store
records their content hashes (:meth:`FrozenParts.describe`) and refuses another VAE or text encoder.

Shapes: images (B, C, H, W) float32 in [-1, 1]; latents (B, c, H / f, W / f) with f the VAE's downsampling
factor, scaled as the pipeline's UNet sees them (``(z - shift_factor) * scaling_factor``); captions B strings;
encoder states (B, L, D) with L the tokenizer's ``model_max_length`` and D the text encoder's width.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from projidx.errors import ProjidxError, one_line
from projidx.files import file_sha256, read_json_object
from projidx.seeding import generator
from projidx.settings import LATENTS

COMPONENTS = ("vae", "text_encoder", "tokenizer")  # the frozen parts, by their folder names in a pipeline
VAES = ("AutoencoderKL",)  # latent_dist.mean / .std: the KL autoencoders Stable-Diffusion-style pipelines use
LATENT_SEED = "latents"  # the stream of --latents sample draws: (seed, sample id)


def folder_digest(folder: Path) -> str:
    """sha256 over every file under ``folder`` (its relative name and its own sha256), in name order: one digest
    of a component's weights, config and vocabulary together. A JSON object's bookkeeping keys (``_name_or_path``,
    ``_diffusers_version``, ...: where it was saved from, by which version) are left out, so a copy saved
    elsewhere has the same digest."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}\0{_content_digest(path)}\0".encode())
    return h.hexdigest()


def _content_digest(path: Path) -> str:
    """sha256 of a file; of a JSON object's keys and values without the ``_``-prefixed ones (canonical JSON)."""
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            value = None
        if isinstance(value, dict):
            body = {k: v for k, v in value.items() if not k.startswith("_")}
            return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return file_sha256(path)


@dataclass
class FrozenParts:
    """A pipeline's VAE (None: a pixel-space model), tokenizer and text encoder (None: no text encoder; encoder
    states then come precomputed with the data), their folder digests (``hashes``: {component: sha256}) and the
    scheduler's config (for sampling)."""

    vae: nn.Module | None = None
    tokenizer: object | None = None
    text_encoder: nn.Module | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    scheduler_config: dict = field(default_factory=dict)

    def describe(self) -> dict[str, str]:
        """{component: folder digest} of the parts present: what a store records of them."""
        return dict(sorted(self.hashes.items()))

    @property
    def factor(self) -> int:
        """The VAE's spatial downsampling factor f (2 per down block after the first)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)  # type: ignore[union-attr]

    def pixel_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of the images whose latents are ``latent_shape`` (c, h, w)."""
        _, h, w = latent_shape
        return int(self.vae.config.in_channels), h * self.factor, w * self.factor  # type: ignore[union-attr]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, ids: torch.Tensor, mode: str, seed: int,
                      device: str | torch.device = "cpu") -> torch.Tensor:
        """(B, c, h, w) float32 latents (on the CPU) of images (B, C, H, W) in [-1, 1]: the posterior's mean
        (``mode="mean"``) or a draw mean + std * eps with eps seeded by (``seed``, sample id) (``"sample"``), shifted
        and scaled as the UNet was trained on them."""
        if mode not in LATENTS:
            raise ProjidxError(f"latents must be one of {', '.join(LATENTS)}, got {mode!r}")
        vae = self.vae.to(device)  # type: ignore[union-attr]
        dist = vae.encode(images.to(device)).latent_dist
        z = dist.mean
        if mode == "sample":
            eps = torch.stack([torch.randn(z.shape[1:], generator=generator(LATENT_SEED, seed, int(i))) for i in ids])
            z = z + dist.std * eps.to(device)
        shift = vae.config.get("shift_factor") or 0.0
        return ((z - shift) * vae.config.scaling_factor).float().cpu()

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], device: str | torch.device = "cpu") -> torch.Tensor:
        """(B, L, D) float32 encoder states (on the CPU) of B captions: tokenized as the pipeline's training scripts
        do (padded to the tokenizer's ``model_max_length``, truncated), then the text encoder's last hidden
        state."""
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,  # type: ignore[misc,union-attr]
                                truncation=True, return_tensors="pt").input_ids
        return self.text_encoder.to(device)(tokens.to(device))[0].float().cpu()  # type: ignore[union-attr]


def _component_class(library: str, name: str, folder: Path):
    """The class ``name`` of ``library`` (diffusers or transformers); ProjidxError naming the folder otherwise."""
    try:
        module = __import__(library)
    except ImportError as e:
        raise ProjidxError(f"checkpoints {folder}: loading it needs {library}: pip install 'projidx[diffusers]'") from e
    cls = getattr(module, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ProjidxError(f"checkpoints {folder}: {library} has no model class {name!r}")
    return cls


def load_frozen_parts(pipeline: Path, config: dict, cross_attention_dim: int | None) -> FrozenParts:
    """The frozen parts in the pipeline folder ``pipeline`` (``vae/``, ``tokenizer/``, ``text_encoder/``; each
    optional; ``config`` the UNet's config), loaded from local files only and checked: an ``AutoencoderKL`` whose
    latents fit the UNet's input channels, a tokenizer and a text encoder that come together, whose vocabulary
    and length fit the text encoder's tables and whose width is the UNet's ``cross_attention_dim``."""
    parts = FrozenParts()
    where = f"checkpoints {pipeline}"
    present = [c for c in COMPONENTS if (pipeline / c).is_dir()]
    if "vae" in present:
        kind = read_json_object(pipeline / "vae" / "config.json", where).get("_class_name")
        if kind not in VAES:
            raise ProjidxError(f"{where}: the VAE is a {kind!r}; supported: {', '.join(VAES)}")
        parts.vae = _load(_component_class("diffusers", kind, pipeline), pipeline / "vae", where)
        latent = int(parts.vae.config.latent_channels)
        if latent != int(config.get("in_channels", 4)):
            raise ProjidxError(f"{where}: the VAE makes {latent}-channel latents, the UNet takes"
                               f" {config.get('in_channels')} channels")
    if ("tokenizer" in present) != ("text_encoder" in present):
        have, lacks = ("tokenizer", "text_encoder") if "tokenizer" in present else ("text_encoder", "tokenizer")
        raise ProjidxError(f"{where}: a {have}/ folder without a {lacks}/ folder; captions need both")
    if "text_encoder" in present:
        if cross_attention_dim is None:
            raise ProjidxError(f"{where}: has a text encoder, but its UNet takes no cross-attention states")
        import transformers

        parts.tokenizer = _load(transformers.AutoTokenizer, pipeline / "tokenizer", where)
        architectures = read_json_object(pipeline / "text_encoder" / "config.json", where).get("architectures")
        name = architectures[0] if isinstance(architectures, list) and architectures else "AutoModel"
        parts.text_encoder = _load(_component_class("transformers", name, pipeline), pipeline / "text_encoder", where)
        check_text_parts(parts.tokenizer, parts.text_encoder.config, cross_attention_dim, where)
    for module in (parts.vae, parts.text_encoder):
        if module is not None:
            module.eval().requires_grad_(False)
    parts.hashes = {c: folder_digest(pipeline / c) for c in present}
    return parts


def check_text_parts(tokenizer, text_config, cross_attention_dim: int, where: str) -> None:
    """ProjidxError unless the tokenizer's ids index the text encoder's embedding table (vocabulary size), its
    ``model_max_length`` fits the position table, and the encoder's width is the UNet's cross-attention width."""
    get = text_config.get if isinstance(text_config, dict) else lambda key, default=None: getattr(
        text_config, key, default)
    vocab, rows = len(tokenizer), get("vocab_size")
    if rows is not None and vocab > int(rows):
        raise ProjidxError(f"{where}: the tokenizer has {vocab} tokens, the text encoder's embedding table"
                           f" {rows} rows: they do not belong together")
    length, positions = tokenizer.model_max_length, get("max_position_embeddings")
    if length is None or length > 1 << 20:
        raise ProjidxError(f"{where}: the tokenizer sets no model_max_length (the caption length the text encoder"
                           " was trained with)")
    if positions is not None and length > int(positions):
        raise ProjidxError(f"{where}: the tokenizer pads captions to {length} tokens, the text encoder has"
                           f" {positions} positions: they do not belong together")
    width = get("hidden_size") or get("d_model")
    if width is not None and int(width) != cross_attention_dim:
        raise ProjidxError(f"{where}: the text encoder's states are {width} wide, the UNet's cross-attention"
                           f" takes {cross_attention_dim}")


def _load(cls, folder: Path, where: str):
    """``cls.from_pretrained(folder)`` from local files only; ProjidxError naming the folder on any failure."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # diffusers / transformers raise OSError, ValueError, EnvironmentError, ...
        raise ProjidxError(f"{where}: cannot load {folder.name}/ ({one_line(e)})") from e


def sample_pipeline(parts: FrozenParts, unet: nn.Module, prompts: Sequence[str], image_shape: Sequence[int],
                    steps: int, guidance_scale: float, seed: int) -> torch.Tensor:
    """(len(prompts), C, H, W) images in [-1, 1] generated as a user of the pipeline makes them: diffusers'
    ``StableDiffusionPipeline`` over these parts and ``unet`` (a ``UNet2DConditionModel`` with a checkpoint's
    weights), with a DDIM scheduler made from the pipeline's own scheduler config (deterministic given the seed),
    ``steps`` steps and classifier-free ``guidance_scale``, starting from a CPU generator seeded with ``seed``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=unet, scheduler=DDIMScheduler.from_config(parts.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    _, h, w = image_shape
    out = pipe(list(prompts), height=h, width=w, num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(seed), output_type="pt")
    return (out.images.float().cpu() * 2 - 1).clamp(-1, 1)
