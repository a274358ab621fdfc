"""Datasets: the built-in ``digits`` (scikit-learn's 8x8 digits, no download) and ``.npz`` files.

Every dataset is an :class:`ImageSet`: float32 images in [-1, 1] shaped (N, C, H, W) and stable int64
sample ids. A DATA spec is ``digits``, ``digits:train`` (the first 1,500), ``digits:test`` (the other
297), ``photos`` (1,200 16x16 RGB patches of the two photographs scikit-learn ships, ``photos:train`` = first
1,000, ``photos:test`` = the rest; ``photos:gray8`` = 8x8 grayscale versions), or a path to an ``.npz``
holding ``images`` (N, H, W) or (N, C, H, W), uint8 in [0, 255] or float
already in [-1, 1], and optionally ``ids`` (N,) unique integers (default 0..N-1).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from projidx.errors import ProjidxError, one_line

DIGITS_TRAIN = 1500
PHOTO_PATCHES, PHOTOS_TRAIN = 1200, 1000
BUILTIN = ("digits", "digits:train", "digits:test", "photos", "photos:train", "photos:test", "photos:gray8")


@dataclass(frozen=True)
class ImageSet:
    """images: (N, C, H, W) float32 in [-1, 1]; ids: (N,) int64, unique."""

    name: str
    images: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """sha256 over the images' bytes and the ids: two datasets share it only if they are equal."""
        h = hashlib.sha256()
        h.update(str(self.image_shape).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.ids.contiguous().numpy().tobytes())
        return h.hexdigest()

    def subset(self, rows: slice) -> ImageSet:
        return ImageSet(self.name, self.images[rows], self.ids[rows])


def load_dataset(spec: str) -> ImageSet:
    """Load a DATA spec (see module docstring); raises :class:`ProjidxError` on bad input."""
    if spec.startswith("digits") and spec in BUILTIN:
        return _digits(spec)
    if spec.startswith("photos") and spec in BUILTIN:
        return _photos(spec)
    path = Path(spec)
    if not path.exists():
        raise ProjidxError(f"data {spec!r}: no such file (expected one of {', '.join(BUILTIN)} or an .npz path)")
    return from_npz(path)


def _digits(spec: str) -> ImageSet:
    from sklearn.datasets import load_digits

    raw = load_digits().images.astype(np.float32)  # (1797, 8, 8), values 0..16
    images = torch.from_numpy(raw / 16.0 * 2.0 - 1.0)[:, None]
    ids = torch.arange(len(images), dtype=torch.int64)
    rows = {"digits": slice(None), "digits:train": slice(0, DIGITS_TRAIN), "digits:test": slice(DIGITS_TRAIN, None)}
    return ImageSet(spec, images, ids).subset(rows[spec])


def _photos(spec: str) -> ImageSet:
    """Patches of scikit-learn's two bundled photographs (china.jpg, flower.jpg), downscaled 4x, fixed seed."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(img, dtype=np.float32) for img in load_sample_images().images]  # (427, 640, 3) uint8
    small = [p[: p.shape[0] // 4 * 4, : p.shape[1] // 4 * 4].reshape(p.shape[0] // 4, 4, p.shape[1] // 4, 4, 3)
             .mean(axis=(1, 3)) for p in photos]
    rng = np.random.default_rng(0)
    patches = []
    for i in range(PHOTO_PATCHES):
        img = small[i % len(small)]
        y, x = rng.integers(0, img.shape[0] - 16), rng.integers(0, img.shape[1] - 16)
        patches.append(img[y : y + 16, x : x + 16].transpose(2, 0, 1))
    images = torch.from_numpy(np.stack(patches) / 255.0 * 2.0 - 1.0).float()
    ids = torch.arange(PHOTO_PATCHES, dtype=torch.int64)
    if spec == "photos:gray8":
        gray = images.mean(dim=1, keepdim=True)
        return ImageSet(spec, gray.reshape(-1, 1, 8, 2, 8, 2).mean(dim=(3, 5)), ids)
    rows = {"photos": slice(None), "photos:train": slice(0, PHOTOS_TRAIN), "photos:test": slice(PHOTOS_TRAIN, None)}
    return ImageSet(spec, images, ids).subset(rows[spec])


def from_npz(path: Path) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                raise ProjidxError(f"data {path}: no array named 'images' (found: {', '.join(f.files) or 'none'})")
            images = f["images"]
            ids = f["ids"] if "ids" in f.files else None
    except ProjidxError:
        raise
    except Exception as e:  # zip/format errors from numpy
        raise ProjidxError(f"data {path}: not a readable .npz file ({one_line(e)})") from e
    return from_arrays(images, ids, name=str(path.resolve()))


def from_arrays(images: np.ndarray, ids: np.ndarray | None = None, name: str = "arrays") -> ImageSet:
    """Validate and convert raw arrays to an :class:`ImageSet` (see module docstring for the rules)."""
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ProjidxError(f"data {name}: 'images' must be (N,H,W) or (N,C,H,W), got shape {images.shape}")
    n, c, h, w = images.shape
    if n == 0:
        raise ProjidxError(f"data {name}: the dataset is empty")
    if c not in (1, 3) or h < 8 or w < 8:
        raise ProjidxError(f"data {name}: images must have 1 or 3 channels and be at least 8x8, got {images.shape[1:]}")
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / 255.0 * 2.0 - 1.0
    elif np.issubdtype(images.dtype, np.floating):
        x = images.astype(np.float32)
        bad = ~np.isfinite(x).reshape(n, -1).all(axis=1)
        if bad.any():
            raise ProjidxError(f"data {name}: image {int(np.argmax(bad))} contains NaN or inf")
        if x.min() < -1.0 - 1e-4 or x.max() > 1.0 + 1e-4:
            raise ProjidxError(
                f"data {name}: float images must lie in [-1, 1], got [{x.min():.3g}, {x.max():.3g}]"
                " (pass uint8 in [0, 255] to have them scaled)"
            )
    else:
        raise ProjidxError(f"data {name}: images must be uint8 or float, got {images.dtype}")
    if ids is None:
        id_arr = np.arange(n, dtype=np.int64)
    else:
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise ProjidxError(f"data {name}: 'ids' must be {n} integers, got {ids.dtype} {ids.shape}")
        id_arr = ids.astype(np.int64)
        if len(np.unique(id_arr)) != n:
            raise ProjidxError(f"data {name}: 'ids' are not unique")
        if (id_arr < 0).any():
            raise ProjidxError(f"data {name}: 'ids' must be non-negative (-1 marks an empty result slot)")
    return ImageSet(name, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(id_arr))
