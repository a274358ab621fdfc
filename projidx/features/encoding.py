"""What the UNet of a latent or text-to-image pipeline sees of a dataset: images encoded by the pipeline's VAE,
captions by its tokenizer and text encoder (:class:`~projidx.models.pipeline.FrozenParts`), on both sides (training
rows and queries). The encoders are run once per row; training-side latents are cached next to the store
(:class:`LatentCache`), so the other checkpoints, a resumed run and a repaired chunk read them back instead.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace

import numpy as np
import torch

from projidx.data.datasets import TEXT_INPUT, Dataset, ImageSet, require_captions
from projidx.models.checkpoints import CheckpointSet
from projidx.models.pipeline import FrozenParts
from projidx.store.locations import Location

CACHE_SUFFIX = ".latents"  # STORE.latents/: the latent cache beside a store


def encoders_record(ckpts: CheckpointSet, latents: str) -> dict[str, str]:
    """What a store records of a pipeline's frozen parts: {component: folder digest} and, with a VAE, the latent
    setting (settings.LATENTS); {} for a model without frozen parts."""
    if ckpts.frozen is None:
        return {}
    return {**ckpts.frozen.describe(), **({"latents": latents} if ckpts.frozen.vae is not None else {})}


def shape_hint(ckpts: CheckpointSet) -> str:
    """The words that explain a pipeline's image size: its VAE's downsampling into the UNet's latents."""
    if ckpts.frozen is None or ckpts.frozen.vae is None:
        return ""
    c, h, w = ckpts.image_shape
    f = ckpts.frozen.factor
    return (f" (the pipeline's VAE encodes {c}x{h}x{w} images into the UNet's {h // f}x{w // f} latents: pass"
            f" --resize {h}x{w})")


class LatentCache:
    """Latents of one dataset under one VAE and latent setting, one file per row range, in ``folder``
    (``STORE.latents/<key>/rows-<start>-<stop>.npz``: ``latents`` (n, c, h, w) float32, the rows' ``ids``, and a
    ``digest`` of both). A file that is missing, unreadable or not what its name and digest say is a miss."""

    def __init__(self, folder: Location) -> None:
        self.folder = folder

    @classmethod
    def beside(cls, store: str | Location, vae: str, data_fingerprint: str, latents: str, seed: int) -> LatentCache:
        """The cache of the store at ``store`` for a VAE (folder digest), a dataset and a latent setting (the seed
        only matters to ``sample``)."""
        key = json.dumps([vae, data_fingerprint, latents, seed if latents == "sample" else None])
        return cls(Location.parse(store).sibling(CACHE_SUFFIX) / hashlib.sha256(key.encode()).hexdigest()[:32])

    def _file(self, rows: slice) -> Location:
        return self.folder / f"rows-{rows.start:010d}-{rows.stop:010d}.npz"

    def get(self, rows: slice, ids: torch.Tensor) -> torch.Tensor | None:
        """(n, c, h, w) cached latents of ``rows`` (whose sample ids are ``ids``), or None."""
        try:
            with np.load(io.BytesIO(self._file(rows).read_bytes()), allow_pickle=False) as f:
                latents, stored_ids, digest = f["latents"], f["ids"], str(f["digest"])
        except Exception:  # missing, torn or not an .npz: computed again
            return None
        if not np.array_equal(stored_ids, ids.numpy()) or digest != _digest(latents, stored_ids):
            return None
        return torch.from_numpy(latents)

    def put(self, rows: slice, ids: torch.Tensor, latents: torch.Tensor) -> None:
        """Write the latents of ``rows`` whole (or not at all)."""
        self.folder.fs.makedirs(self.folder.path, exist_ok=True)
        values, id_array = latents.numpy().astype(np.float32), ids.numpy().astype(np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, latents=values, ids=id_array, digest=np.array(_digest(values, id_array)))
        self._file(rows).write_bytes(buffer.getvalue())


def _digest(latents: np.ndarray, ids: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in (latents, ids):
        h.update(f"{a.dtype}{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class EncodedRows:
    """The rows of ``data`` as a pipeline's UNet sees them (the part of the :class:`Dataset` interface
    featurization reads: ``subset``, ``ids``, ``image_shape``, ``len``). :meth:`subset` returns an ImageSet whose
    ``images`` are the VAE's latents (c, h, w) (with a VAE; cached by row range in ``cache`` when given) and whose
    ``embeddings`` are the text encoder's states (L, D) of the captions (with a text encoder, where the data
    carries no precomputed embeddings). The model's other inputs (``needs``) are checked here, and every caption
    required, before anything is encoded."""

    def __init__(self, data: Dataset, parts: FrozenParts, needs: dict[str, dict], latents: str, seed: int,
                 device: str = "cpu", batch_size: int = 32, cache: LatentCache | None = None) -> None:
        self.data, self.parts, self.latents, self.seed = data, parts, latents, seed
        self.device, self.batch_size, self.cache = device, batch_size, cache
        self.text = TEXT_INPUT in needs and parts.text_encoder is not None and data.embeddings is None
        if self.text:
            require_captions(data)
        data.conditioning({k: v for k, v in needs.items() if not (self.text and k == TEXT_INPUT)})
        self.ids, self.name = data.ids, data.name
        c, h, w = data.image_shape
        self.image_shape = (int(parts.vae.config.latent_channels), h // parts.factor, w // parts.factor) \
            if parts.vae is not None else (c, h, w)

    def __len__(self) -> int:
        return len(self.data)

    def subset(self, rows: slice | np.ndarray) -> ImageSet:
        """The rows ``rows`` encoded: latents as ``images``, encoder states as ``embeddings``."""
        part = self.data.subset(rows)
        images = self._latents(part, rows) if self.parts.vae is not None else part.images
        embeddings = self._text(part.captions) if self.text else part.embeddings  # type: ignore[arg-type]
        return replace(part, images=images, embeddings=embeddings)

    def _latents(self, part: ImageSet, rows: slice | np.ndarray) -> torch.Tensor:
        cached = isinstance(rows, slice) and self.cache is not None
        if cached:
            found = self.cache.get(rows, part.ids)  # type: ignore[union-attr]
            if found is not None:
                return found
        latents = torch.cat([self.parts.encode_images(part.images[a : a + self.batch_size],
                                                      part.ids[a : a + self.batch_size], self.latents, self.seed,
                                                      self.device)
                             for a in range(0, len(part), self.batch_size)])
        if cached:
            self.cache.put(rows, part.ids, latents)  # type: ignore[union-attr]
        return latents

    def _text(self, captions: tuple[str, ...]) -> torch.Tensor:
        return torch.cat([self.parts.encode_text(captions[a : a + self.batch_size], self.device)
                          for a in range(0, len(captions), self.batch_size)])


def model_rows(ckpts: CheckpointSet, data: Dataset, needs: dict[str, dict], latents: str, seed: int,
               device: str = "cpu", batch_size: int = 32, cache: LatentCache | None = None) -> Dataset | EncodedRows:
    """The rows ``ckpts``' model is given: ``data`` itself for a model without frozen parts (its conditioning
    inputs ``needs`` checked), else :class:`EncodedRows`."""
    if ckpts.frozen is None:
        data.conditioning(needs)
        return data
    return EncodedRows(data, ckpts.frozen, needs, latents, seed, device, batch_size, cache)
