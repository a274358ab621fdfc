"""Datasets: built-in ones (no download), image files and folders, ``.npy`` / ``.npz`` arrays.

Every dataset is an :class:`ImageSet`: float32 images in [-1, 1] shaped (N, C, H, W), stable int64 sample ids
and, for files, the file names (shown in results and pictures). A DATA spec is one of:

- ``digits``, ``digits:train`` (the first 1,500), ``digits:test`` (the other 297): scikit-learn's 8x8 digits;
  ``photos`` (1,200 16x16 RGB patches of the two photographs scikit-learn ships, ``photos:train`` = first 1,000,
  ``photos:test`` = the rest; ``photos:gray8`` = 8x8 grayscale versions);
- a folder of images (PNG, JPEG, ...; read with Pillow), ids 0..N-1 in sorted file-name order; a folder of
  sub-folders of images is read per class (``labels`` = the sub-folder's index in sorted order);
- one image file;
- an ``.npy`` array, or an ``.npz`` with ``images`` and optionally ``ids`` (N,) unique integers, ``labels`` (N,)
  class labels, ``embeddings`` (N, L, D) conditioning embeddings (for a text-conditional model) and ``captions``
  (N,) strings;
  arrays (N, H, W), (N, C, H, W) or channels-last (N, H, W, C), C in {1, 3};
- a Hugging Face dataset: a ``save_to_disk`` folder or a ``.parquet`` file (``image_column``, ``label_column``).

Captions (the text of each image, for a text-to-image pipeline's text encoder) come from an image folder's
``metadata.jsonl`` or ``metadata.csv`` (Hugging Face's ``imagefolder`` convention: ``file_name`` and the caption
column, ``text`` by default) or a ``.txt`` file beside each image (``a.png`` -> ``a.txt``), from a Hugging Face
dataset's caption column (``DataOptions.caption_column``; ``text`` where present) or from an ``.npz`` ``captions``
array of strings.

Values (:class:`DataOptions`): uint8 is read as [0, 255]; float must be in [-1, 1], or be declared with
``value_range`` ("0,1", "0,255"): float data that looks like [0, 1] or [0, 255] is refused with a message naming the
option, never silently read as [-1, 1]. ``resize`` (H, W) resizes every image (bilinear, antialiased): images of
different sizes are refused without it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from projidx.errors import ProjidxError, one_line
from projidx.settings import DataOptions

DIGITS_TRAIN = 1500
PHOTO_PATCHES, PHOTOS_TRAIN = 1200, 1000
STREAM_ROWS = 1024  # rows a streamed pass (fingerprint, value range) reads at a time
BUILTIN = ("digits", "digits:train", "digits:test", "photos", "photos:train", "photos:test", "photos:gray8")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# conditioning input of a model (diffusion.model_conditioning) -> the ImageSet field that holds it
CONDITIONING_FIELDS = {"class_labels": "labels", "encoder_hidden_states": "embeddings"}
TEXT_INPUT = "encoder_hidden_states"  # the model input a text encoder makes of captions
CAPTION_HINT = ("captions: a metadata.jsonl or metadata.csv beside the images (file_name, text), a .txt file per"
                " image, a Hugging Face caption column (--caption-column), an .npz 'captions' array, or --prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CONDITIONING_HINTS = {
    "labels": "class labels: an .npz 'labels' array, one sub-folder per class, or --label-column",
    "embeddings": "precomputed embeddings: an .npz 'embeddings' array (N, L, D), e.g. a text encoder's output",
}


@dataclass(frozen=True)
class ImageSet:
    """images: (N, C, H, W) float32 in [-1, 1]; ids: (N,) int64, unique; names: N display names (file names) or
    None; labels: (N,) int64 class labels or None; embeddings: (N, L, D) float32 per-sample conditioning
    embeddings (a text-conditional model's encoder states) or None; captions: N texts (None for an image without
    one) or None."""

    name: str
    images: torch.Tensor
    ids: torch.Tensor
    names: tuple[str, ...] | None = field(default=None, compare=False)
    labels: torch.Tensor | None = field(default=None, compare=False)
    options: DataOptions = field(default=DataOptions(), compare=False)  # how it was read (to read it again)
    embeddings: torch.Tensor | None = field(default=None, compare=False)
    captions: tuple[str | None, ...] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self, conditioning: tuple[str, ...] = ()) -> str:
        """sha256 over the images' bytes and the ids, and the conditioning inputs named (they change every
        gradient; encoder states made from captions: the captions): two datasets share it only if they are
        equal."""
        return fingerprint(self.image_shape, [self.images], self.ids, *fingerprint_inputs(self, conditioning))

    def conditioning(self, needs: dict[str, dict]) -> dict[str, torch.Tensor]:
        """{model input: (N, ...) tensor} for the conditioning a model ``needs``: see :func:`check_conditioning`."""
        return check_conditioning(self.name, {"labels": self.labels, "embeddings": self.embeddings}, needs)

    def subset(self, rows: slice | np.ndarray) -> ImageSet:
        """The rows ``rows`` (a slice, or an array of row numbers) with everything that goes with them."""
        def pick(values: tuple | None) -> tuple | None:
            if values is None:
                return None
            return values[rows] if isinstance(rows, slice) else tuple(values[int(r)] for r in rows)

        names, captions = pick(self.names), pick(self.captions)
        rows = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.int64)
        return replace(self, images=self.images[rows], ids=self.ids[rows], names=names, captions=captions,
                       labels=self.labels[rows] if self.labels is not None else None,
                       embeddings=self.embeddings[rows] if self.embeddings is not None else None)

    def display_names(self, ids: np.ndarray) -> list[list[str]]:
        """(M, k) ids -> their file names (or the ids as text); "" for the empty slot -1."""
        return display_names(self.ids, self.names, ids)


def fingerprint(image_shape: tuple[int, ...], image_chunks: Iterable[torch.Tensor], ids: torch.Tensor,
                conditioning: dict[str, torch.Tensor], captions: tuple[str | None, ...] | None = None) -> str:
    """sha256 over the image shape, the float32 images' bytes (given in row order, in chunks of any size), the ids,
    the conditioning tensors and the captions where given: the same digest whether the images are in memory or
    streamed."""
    h = hashlib.sha256()
    h.update(str(tuple(image_shape)).encode())
    for chunk in image_chunks:
        h.update(chunk.contiguous().numpy().tobytes())
    h.update(ids.contiguous().numpy().tobytes())
    for name, value in sorted(conditioning.items()):
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        h.update(value.contiguous().numpy().tobytes())
    if captions is not None:
        h.update(b"captions:" + json.dumps(list(captions)).encode())
    return h.hexdigest()


def fingerprint_inputs(data: Dataset, conditioning: tuple[str, ...]
                       ) -> tuple[dict[str, torch.Tensor], tuple[str | None, ...] | None]:
    """(conditioning tensors, captions) a dataset's fingerprint covers for the model inputs ``conditioning``: the
    data's tensors, except that encoder states a text encoder makes of the data's captions (no precomputed
    embeddings) are covered by the captions."""
    text = TEXT_INPUT in conditioning and data.embeddings is None and data.captions is not None
    tensors = data.conditioning({c: {} for c in conditioning if not (text and c == TEXT_INPUT)})
    return tensors, data.captions if text else None


def with_prompt(data: ImageSet, prompt: str | None) -> ImageSet:
    """``data`` with ``prompt`` as the caption of every image (a query's prompt; None: ``data`` unchanged)."""
    return data if prompt is None else replace(data, captions=(prompt,) * len(data))


def require_captions(data: Dataset) -> tuple[str, ...]:
    """Every image's caption; ProjidxError naming the data, or the first image without one."""
    if data.captions is None:
        raise ProjidxError(f"data {data.name}: the pipeline encodes captions with its text encoder; give the data"
                           f" {CAPTION_HINT}")
    missing = [r for r, c in enumerate(data.captions) if c is None]
    if missing:
        r = missing[0]
        which = data.names[r] if data.names is not None else f"id {int(data.ids[r])}"
        raise ProjidxError(f"data {data.name}: no caption for image {which} ({len(missing)} of {len(data)} images"
                           f" have none); give every image {CAPTION_HINT}")
    return data.captions  # type: ignore[return-value]


def display_names(data_ids: torch.Tensor, names: tuple[str, ...] | None, ids: np.ndarray) -> list[list[str]]:
    """(M, k) sample ids of a dataset with ``data_ids`` and file ``names`` -> their file names (or the ids as
    text); "" for the empty slot -1."""
    by_id = {int(i): (names[r] if names is not None else str(int(i))) for r, i in enumerate(data_ids.tolist())}
    return [[by_id.get(int(i), "") if int(i) >= 0 else "" for i in row] for row in np.atleast_2d(ids)]


def check_conditioning(name: str, fields: dict[str, torch.Tensor | None], needs: dict[str, dict]
                       ) -> dict[str, torch.Tensor]:
    """{model input: (N, ...) tensor} for the conditioning a model ``needs``
    (:func:`~projidx.models.diffusion.model_conditioning`) from a dataset's ``fields`` (labels, embeddings),
    checked against the model's requirements (class count, embedding width); ProjidxError naming what the data lacks."""
    out = {}
    for need_name, need in needs.items():
        if need_name not in CONDITIONING_FIELDS:
            raise ProjidxError(f"the model takes {need_name!r}, which projidx cannot read from data (it passes"
                               f" {', '.join(CONDITIONING_FIELDS)})")
        attr = CONDITIONING_FIELDS[need_name]
        value = fields.get(attr)
        if value is None:
            raise ProjidxError(f"data {name}: the model is conditioned on {need_name}; give the data"
                               f" {CONDITIONING_HINTS[attr]}")
        classes = need.get("classes")
        if classes is not None and len(value) and (int(value.min()) < 0 or int(value.max()) >= classes):
            raise ProjidxError(f"data {name}: class labels must lie in [0, {classes}) for this model, found"
                               f" {int(value.min())}..{int(value.max())}")
        dim = need.get("dim")
        if dim is not None and value.shape[-1] != dim:
            raise ProjidxError(f"data {name}: embeddings are {tuple(value.shape[1:])}, the model's"
                               f" cross-attention takes (L, {dim})")
        out[need_name] = value
    return out


class StreamedImages:
    """A dataset whose images stay on disk and are read a few rows at a time (:meth:`subset`): an ``.npy`` array
    (memory-mapped), a folder of image files, or a Hugging Face dataset's image column. ids, names, labels and
    embeddings are in memory; the images never are all at once. Rows read equal those of the in-memory load bit
    for bit, and :meth:`fingerprint` (computed chunk by chunk) equals :meth:`ImageSet.fingerprint`.

    ``read(rows)``: (len(rows), C, H, W) float32 images in [-1, 1] of the row numbers ``rows``.
    """

    def __init__(self, name: str, ids: torch.Tensor, read: Callable[[np.ndarray], torch.Tensor],
                 names: tuple[str, ...] | None = None, labels: torch.Tensor | None = None,
                 options: DataOptions = DataOptions(), embeddings: torch.Tensor | None = None,
                 captions: tuple[str | None, ...] | None = None) -> None:
        self.name, self.ids, self.names, self.labels, self.embeddings = name, ids, names, labels, embeddings
        self.captions = captions
        self.options = options
        self._read = read
        self.image_shape: tuple[int, int, int] = tuple(int(v) for v in read(np.arange(1)).shape[1:])  # type: ignore
        self._fingerprints: dict[tuple[str, ...], str] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: slice | np.ndarray) -> ImageSet:
        """The rows ``rows`` (a slice, or an array of row numbers), read into memory as an :class:`ImageSet`."""
        index = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        header = ImageSet(self.name, torch.empty(len(self), 0), self.ids, self.names, self.labels, self.options,
                          self.embeddings, self.captions).subset(index)
        return replace(header, images=self._read(index))

    def chunks(self, rows: int | None = None) -> Iterator[torch.Tensor]:
        """The images in row order, ``rows`` (default STREAM_ROWS) at a time."""
        rows = rows or STREAM_ROWS
        for start in range(0, len(self), rows):
            yield self._read(np.arange(start, min(start + rows, len(self))))

    def fingerprint(self, conditioning: tuple[str, ...] = ()) -> str:
        """As :meth:`ImageSet.fingerprint`, read chunk by chunk (and remembered)."""
        if conditioning not in self._fingerprints:
            self._fingerprints[conditioning] = fingerprint(self.image_shape, self.chunks(), self.ids,
                                                           *fingerprint_inputs(self, conditioning))
        return self._fingerprints[conditioning]

    def conditioning(self, needs: dict[str, dict]) -> dict[str, torch.Tensor]:
        return check_conditioning(self.name, {"labels": self.labels, "embeddings": self.embeddings}, needs)

    def display_names(self, ids: np.ndarray) -> list[list[str]]:
        return display_names(self.ids, self.names, ids)


Dataset = ImageSet | StreamedImages  # what featurization reads: rows by subset(), ids, fingerprint, conditioning


def concat(name: str, sets: list[ImageSet]) -> ImageSet:
    """One ImageSet of ``sets`` one after the other (ids may repeat: for queries); labels, embeddings, names and
    captions kept where every set has them."""
    def joined(attr: str) -> torch.Tensor | None:
        values = [getattr(s, attr) for s in sets]
        return torch.cat(values) if all(v is not None for v in values) else None

    def chained(attr: str) -> tuple | None:
        values = [getattr(s, attr) for s in sets]
        return tuple(v for part in values for v in part) if all(v is not None for v in values) else None

    return ImageSet(name, torch.cat([s.images for s in sets]), torch.cat([s.ids for s in sets]), chained("names"),
                    joined("labels"), sets[0].options, joined("embeddings"), chained("captions"))


def load_dataset(spec: str, options: DataOptions = DataOptions(), stream: bool = False) -> Dataset:
    """Load a DATA spec (see module docstring); raises :class:`ProjidxError` on bad input. ``stream``: keep the
    images of an ``.npy``, an image folder or a Hugging Face image column on disk (:class:`StreamedImages`);
    other kinds are read into memory either way."""
    if spec.startswith("digits") and spec in BUILTIN:
        return _resized(_digits(spec), options)
    if spec.startswith("photos") and spec in BUILTIN:
        return _resized(_photos(spec), options)
    path = Path(spec)
    if not path.exists():
        raise ProjidxError(f"data {spec!r}: no such file or folder (expected one of {', '.join(BUILTIN)}, an image"
                           " folder, an image file, an .npy or an .npz)")
    if is_hf_dataset(path):
        return from_hf(path, options, stream)
    if path.is_dir():
        return from_folder(path, options, stream)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return from_image_files(path.parent, [path.name], None, options, name=str(path.resolve()))
    if path.suffix.lower() == ".npy":
        try:
            rows = NpyRows(path) if stream else None
        except ValueError:  # Fortran order or not numeric: read whole, as without stream
            rows = None
        except Exception as e:
            raise ProjidxError(f"data {path}: not a readable .npy file ({one_line(e)})") from e
        if rows is not None:
            return stream_arrays(rows, str(path.resolve()), options)
        try:
            images = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ProjidxError(f"data {path}: not a readable .npy file ({one_line(e)})") from e
        return from_arrays(images, None, name=str(path.resolve()), options=options)
    return from_npz(path, options)


def _resized(data: ImageSet, options: DataOptions) -> ImageSet:
    if options.resize is None or tuple(data.images.shape[2:]) == tuple(options.resize):
        return data
    images = torch.nn.functional.interpolate(data.images, size=tuple(options.resize), mode="bilinear",
                                             antialias=True, align_corners=False).clamp(-1, 1)
    return replace(data, images=images.contiguous())


def from_folder(path: Path, options: DataOptions = DataOptions(), stream: bool = False) -> Dataset:
    """A folder of images (ids in sorted file-name order), or of one sub-folder of images per class; ``stream``:
    files are read when their rows are (:func:`stream_image_files`)."""
    load = stream_image_files if stream else from_image_files
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if files:
        return load(path, files, None, options, name=str(path.resolve()))
    per_class = [(c, sorted(p.name for p in (path / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
                 for c in classes]
    per_class = [(c, names) for c, names in per_class if names]
    if not per_class:
        raise ProjidxError(f"data {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder or its"
                           " sub-folders")
    files = [f"{c}/{n}" for c, names in per_class for n in names]
    labels = [k for k, (_, names) in enumerate(per_class) for _ in names]
    return load(path, files, labels, options, name=str(path.resolve()))


def _read_pixels(path: Path) -> np.ndarray:
    """One image file as (H, W) or (H, W, 3) uint8 (:func:`_pixels`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return _pixels(img)
    except (UnidentifiedImageError, OSError) as e:
        raise ProjidxError(f"data {path}: not a readable image ({one_line(e)})") from e


def metadata_captions(root: Path, column: str | None) -> dict[str, str | None] | None:
    """{file name: caption} from ``root``'s ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` and ``column``,
    default ``text``), or None where there is no such file or (column not named) no ``text`` in it."""
    found = [root / m for m in METADATA_FILES if (root / m).is_file()]
    if not found:
        return None
    path = found[0]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                records = list(csv.DictReader(f))
            else:
                records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, csv.Error) as e:
        raise ProjidxError(f"data {path}: not readable ({one_line(e)})") from e
    if not all(isinstance(r, dict) and isinstance(r.get("file_name"), str) for r in records):
        raise ProjidxError(f"data {path}: every record needs a file_name (the imagefolder convention)")
    key = column or "text"
    if not any(key in r for r in records):
        if column is None:
            return None
        raise ProjidxError(f"data {path}: no caption column {column!r} (--caption-column)")
    bad = next((r["file_name"] for r in records if r.get(key) is not None and not isinstance(r[key], str)), None)
    if bad is not None:
        raise ProjidxError(f"data {path}: the caption of {bad} is not text")
    return {Path(r["file_name"]).as_posix(): r.get(key) for r in records}


def folder_captions(root: Path, files: list[str], column: str | None) -> tuple[str | None, ...] | None:
    """The caption of each of ``files`` (relative to ``root``): its metadata entry (:func:`metadata_captions`),
    else the text of the ``.txt`` file beside it, else None; None where the folder has neither."""
    table = metadata_captions(root, column)
    out = []
    for f in files:
        text = table.get(f) if table is not None else None
        side = (root / f).with_suffix(".txt")
        if text is None and side.is_file():
            text = side.read_text(encoding="utf-8").strip()
        out.append(text)
    return tuple(out) if table is not None or any(t is not None for t in out) else None


def from_image_files(root: Path, files: list[str], labels: list[int] | None, options: DataOptions,
                     name: str) -> ImageSet:
    """Read image files (Pillow) as uint8 arrays: grayscale stays one channel unless some image has colour;
    captions from the folder (:func:`folder_captions`)."""
    data = from_pixel_arrays([_read_pixels(root / f) for f in files], options, name)
    return replace(data, names=tuple(files), captions=folder_captions(root, files, options.caption_column),
                   labels=torch.tensor(labels, dtype=torch.int64) if labels is not None else None)


def stream_image_files(root: Path, files: list[str], labels: list[int] | None, options: DataOptions,
                       name: str) -> StreamedImages:
    """:func:`from_image_files`, streamed: only the files' headers are read up front (for the colour and size
    decisions that depend on every image), the pixels when their rows are asked for."""
    from PIL import Image, UnidentifiedImageError

    gray, sizes = True, set()
    for f in files:
        try:
            with Image.open(root / f) as img:
                gray, sizes = gray and img.mode in GRAY_MODES, sizes | {img.size}
        except (UnidentifiedImageError, OSError) as e:
            raise ProjidxError(f"data {root / f}: not a readable image ({one_line(e)})") from e
    _check_sizes(sorted((h, w) for w, h in sizes), options, name)

    def read(rows: np.ndarray) -> torch.Tensor:
        arrays = [_read_pixels(root / files[int(r)]) for r in rows]
        return from_pixel_arrays(arrays, options, name, color=not gray, mixed=len(sizes) > 1).images

    return StreamedImages(name, torch.arange(len(files), dtype=torch.int64), read, tuple(files),
                          torch.tensor(labels, dtype=torch.int64) if labels is not None else None, options,
                          captions=folder_captions(root, files, options.caption_column))


GRAY_MODES = ("1", "L", "I;16", "I", "F")  # PIL modes read as one channel


def _pixels(img) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 of a PIL image: grayscale modes stay one channel."""
    return np.asarray(img.convert("L" if img.mode in GRAY_MODES else "RGB"))


def _check_sizes(sizes: list[tuple[int, int]], options: DataOptions, name: str) -> None:
    """Images of different (H, W) ``sizes`` need ``options.resize``."""
    if len(sizes) > 1 and options.resize is None:
        raise ProjidxError(f"data {name}: images have different sizes ({sizes[0][0]}x{sizes[0][1]},"
                           f" {sizes[-1][0]}x{sizes[-1][1]}, ...): pass --resize HxW")


def from_pixel_arrays(arrays: list[np.ndarray], options: DataOptions, name: str, color: bool | None = None,
                      mixed: bool | None = None) -> ImageSet:
    """Stack (H, W) / (H, W, 3) uint8 images: grayscale is repeated to 3 channels when any image has colour;
    different sizes need ``options.resize`` (resized with Pillow). ``color`` and ``mixed`` (sizes differ): the
    decisions for the whole dataset when ``arrays`` are some of its rows (None: from ``arrays``)."""
    color = any(a.ndim == 3 for a in arrays) if color is None else color
    if color:
        arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    sizes = sorted({a.shape[:2] for a in arrays})
    if (len(sizes) > 1) if mixed is None else mixed:
        _check_sizes(sizes, options, name)  # a forced ``mixed`` was checked for the whole dataset
        from PIL import Image as PILImage

        h, w = options.resize
        arrays = [np.asarray(PILImage.fromarray(a).resize((w, h), PILImage.BILINEAR)) for a in arrays]
    stacked = np.stack(arrays)
    stacked = stacked.transpose(0, 3, 1, 2) if stacked.ndim == 4 else stacked[:, None]
    return from_arrays(stacked, None, name=name, options=options)


def is_hf_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict), or a parquet file."""
    return path.suffix == ".parquet" or (path.is_dir() and ((path / "dataset_info.json").is_file()
                                                            or (path / "dataset_dict.json").is_file()))


def from_hf(path: Path, options: DataOptions, stream: bool = False) -> Dataset:
    """A Hugging Face dataset: a ``save_to_disk`` folder (a DatasetDict uses its "train" split) or a parquet file;
    images from ``options.image_column`` (PIL images or arrays), labels from ``options.label_column`` (default
    "label" when present). Ids are the row numbers. ``stream``: an image column (the datasets Image feature) is
    decoded when its rows are asked for; only the images' headers are read up front."""
    try:
        import datasets
    except ImportError as e:
        raise ProjidxError(f"data {path}: Hugging Face datasets need: pip install 'projidx[hf]'") from e
    try:
        ds = datasets.Dataset.from_parquet(str(path)) if path.suffix == ".parquet" else datasets.load_from_disk(
            str(path))
    except Exception as e:
        raise ProjidxError(f"data {path}: not a readable Hugging Face dataset ({one_line(e)})") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ProjidxError(f"data {path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    columns = ds.column_names
    if options.image_column not in columns:
        raise ProjidxError(f"data {path}: no column {options.image_column!r} (columns: {', '.join(columns)});"
                           " pass --image-column")
    label = options.label_column or ("label" if "label" in columns else None)
    if label is not None and label not in columns:
        raise ProjidxError(f"data {path}: no column {label!r} (columns: {', '.join(columns)})")
    labels = torch.tensor(np.asarray(ds[label]), dtype=torch.int64) if label is not None else None
    caption = options.caption_column or ("text" if "text" in columns else None)
    if caption is not None and caption not in columns:
        raise ProjidxError(f"data {path}: no caption column {caption!r} (columns: {', '.join(columns)})")
    captions = tuple(None if v is None else str(v) for v in ds[caption]) if caption is not None else None
    if stream and isinstance(ds.features[options.image_column], datasets.Image):
        return _stream_hf(ds, options, str(path.resolve()), labels, captions)
    arrays = []
    for value in ds[options.image_column]:
        if hasattr(value, "convert"):  # a PIL image (the datasets Image feature)
            arrays.append(_pixels(value))
        else:
            arrays.append(np.asarray(value))
    name = str(path.resolve())
    if all(a.dtype == np.uint8 and a.ndim in (2, 3) for a in arrays):
        data = from_pixel_arrays(arrays, options, name)
    else:
        data = from_arrays(np.stack(arrays), None, name=name, options=options)
    return replace(data, labels=labels, captions=captions)


def _stream_hf(ds, options: DataOptions, name: str, labels: torch.Tensor | None,
               captions: tuple[str | None, ...] | None) -> StreamedImages:
    """A datasets Image column read as :func:`stream_image_files` reads files: headers first, pixels per row."""
    import io

    import datasets
    from PIL import Image

    raw = ds.cast_column(options.image_column, datasets.Image(decode=False))
    gray, sizes = True, set()
    for start in range(0, len(raw), STREAM_ROWS):
        for value in raw[start : start + STREAM_ROWS][options.image_column]:
            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
            with Image.open(source) as img:
                gray, sizes = gray and img.mode in GRAY_MODES, sizes | {img.size}
    _check_sizes(sorted((h, w) for w, h in sizes), options, name)

    def read(rows: np.ndarray) -> torch.Tensor:
        arrays = [_pixels(img) for img in ds.select(rows.tolist())[options.image_column]]
        return from_pixel_arrays(arrays, options, name, color=not gray, mixed=len(sizes) > 1).images

    return StreamedImages(name, torch.arange(len(ds), dtype=torch.int64), read, labels=labels, options=options,
                          captions=captions)


def _digits(spec: str) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = digits.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    images = torch.from_numpy(raw / 16.0 * 2.0 - 1.0)[:, None]
    ids = torch.arange(len(images), dtype=torch.int64)
    labels = torch.from_numpy(digits.target.astype(np.int64))  # the digit shown (for evaluation; no model needs it)
    rows = {"digits": slice(None), "digits:train": slice(0, DIGITS_TRAIN), "digits:test": slice(DIGITS_TRAIN, None)}
    return ImageSet(spec, images, ids, labels=labels).subset(rows[spec])


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


def from_npz(path: Path, options: DataOptions = DataOptions()) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                raise ProjidxError(f"data {path}: no array named 'images' (found: {', '.join(f.files) or 'none'})")
            images = f["images"]
            ids = f["ids"] if "ids" in f.files else None
            labels = f["labels"] if "labels" in f.files else None
            embeddings = f["embeddings"] if "embeddings" in f.files else None
            captions = f["captions"] if "captions" in f.files else None
    except ProjidxError:
        raise
    except Exception as e:  # zip/format errors from numpy
        raise ProjidxError(f"data {path}: not a readable .npz file ({one_line(e)}); a folder of images, an image"
                           " file, an .npy or an .npz is expected") from e
    data = from_arrays(images, ids, name=str(path.resolve()), options=options)
    if labels is not None:
        if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
            raise ProjidxError(f"data {path}: 'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
        data = replace(data, labels=torch.from_numpy(labels.astype(np.int64)))
    if embeddings is not None:
        if embeddings.ndim != 3 or len(embeddings) != len(data) or not np.issubdtype(embeddings.dtype, np.floating) \
                or not np.isfinite(embeddings).all():
            raise ProjidxError(f"data {path}: 'embeddings' must be finite floats shaped ({len(data)}, L, D), got"
                               f" {embeddings.dtype} {embeddings.shape}")
        data = replace(data, embeddings=torch.from_numpy(embeddings.astype(np.float32)))
    if captions is not None:
        if captions.shape != (len(data),) or captions.dtype.kind != "U":
            raise ProjidxError(f"data {path}: 'captions' must be {len(data)} strings, got {captions.dtype}"
                               f" {captions.shape}")
        data = replace(data, captions=tuple(str(c) for c in captions))
    return data


def channels_first(images: np.ndarray, name: str) -> np.ndarray:
    """(N, C, H, W) from (N, H, W), (N, C, H, W) or channels-last (N, H, W, C), C in {1, 3}."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim != 4:
        raise ProjidxError(f"data {name}: images must be (N,H,W), (N,C,H,W) or (N,H,W,C), got shape {images.shape}")
    if images.shape[1] in (1, 3):
        return images
    if images.shape[3] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    raise ProjidxError(f"data {name}: images must have 1 or 3 channels (first or last axis), got shape"
                       f" {images.shape}")


DECLARED_RANGES = {"-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0), "0,255": (0.0, 255.0)}


def value_bounds(images: np.ndarray, name: str, first_row: int = 0) -> tuple[float, float]:
    """(min, max) of float or integer images; ProjidxError naming the first image (row ``first_row`` + its index)
    with NaN or inf."""
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise ProjidxError(f"data {name}: images must be uint8 or float, got {images.dtype}")
    x = np.asarray(images, dtype=np.float32)
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if bad.any():
        raise ProjidxError(f"data {name}: image {first_row + int(np.argmax(bad))} contains NaN or inf")
    return float(x.min()), float(x.max())


def resolve_value_range(lo: float, hi: float, value_range: str, name: str) -> str:
    """The declared range (DECLARED_RANGES key) of non-uint8 data with values in [lo, hi] read as ``value_range``
    (DataOptions): auto refuses data that looks like [0, 1] or [0, 255] and means [-1, 1]; a declared range the
    values leave is refused."""
    if value_range == "auto":
        if lo >= -1e-4 and hi <= 1 + 1e-4:
            raise ProjidxError(f"data {name}: float images in [{lo:.3g}, {hi:.3g}] look like [0, 1], not [-1, 1]:"
                               " pass --value-range 0,1 (or -1,1 if they are in [-1, 1])")
        if lo >= -1e-4 and hi <= 255 + 1e-3:
            raise ProjidxError(f"data {name}: float images in [{lo:.3g}, {hi:.3g}] look like [0, 255]: pass"
                               " --value-range 0,255")
        value_range = "-1,1"
    a, b = DECLARED_RANGES[value_range]
    tol = 1e-4 * (b - a)
    if lo < a - tol or hi > b + tol:
        raise ProjidxError(f"data {name}: images must lie in [{a:g}, {b:g}] (--value-range {value_range}), got"
                           f" [{lo:.3g}, {hi:.3g}]")
    return value_range


def to_unit_range(images: np.ndarray, value_range: str, name: str) -> np.ndarray:
    """float32 in [-1, 1] from uint8 or float images, per ``value_range`` (DataOptions); refuses float data whose
    range says it is not what was declared (or, for auto, not [-1, 1])."""
    if images.dtype == np.uint8 and value_range in ("auto", "0,255"):
        return images.astype(np.float32) / 255.0 * 2.0 - 1.0
    a, b = DECLARED_RANGES[resolve_value_range(*value_bounds(images, name), value_range, name)]
    return ((images.astype(np.float32) - a) / (b - a) * 2.0 - 1.0).clip(-1, 1).astype(np.float32)


class NpyRows:
    """The rows of a C-ordered ``.npy`` file, read from disk when indexed (``rows[a:b]``, ``rows[array]``) with
    plain reads: unlike a memory map, rows read do not stay resident in the process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        header = np.load(path, mmap_mode="r", allow_pickle=False)  # numpy's parser; only the header is read
        shape, dtype, fortran = header.shape, header.dtype, bool(header.flags.f_contiguous and header.ndim > 1)
        self.offset = int(header.offset)
        del header
        if fortran or dtype.hasobject or not shape:
            raise ValueError("only C-ordered numeric arrays are streamed")
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        index = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        with open(self.path, "rb") as f:
            start = 0
            while start < len(index):  # one read per run of consecutive rows
                stop = start + 1
                while stop < len(index) and index[stop] == index[stop - 1] + 1:
                    stop += 1
                f.seek(self.offset + int(index[start]) * self.row_bytes)
                out[start:stop] = np.frombuffer(f.read((stop - start) * self.row_bytes), self.dtype).reshape(
                    stop - start, *self.shape[1:])
                start = stop
        return out


def stream_arrays(images: NpyRows, name: str, options: DataOptions) -> StreamedImages:
    """:func:`from_arrays` over the rows of an ``.npy`` file, streamed: the value range is decided over every row
    in one streamed pass (as the in-memory load decides it), rows are converted when asked for."""
    if images.ndim not in (3, 4):
        raise ProjidxError(f"data {name}: images must be (N,H,W), (N,C,H,W) or (N,H,W,C), got shape {images.shape}")
    if len(images) == 0:
        raise ProjidxError(f"data {name}: the dataset is empty")
    reading = options
    if not (images.dtype == np.uint8 and options.value_range in ("auto", "0,255")):
        bounds = [value_bounds(images[a : a + STREAM_ROWS], name, a) for a in range(0, len(images), STREAM_ROWS)]
        lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
        reading = replace(options, value_range=resolve_value_range(lo, hi, options.value_range, name))

    def read(rows: np.ndarray) -> torch.Tensor:
        return from_arrays(np.asarray(images[rows]), None, name=name, options=reading).images

    return StreamedImages(name, torch.arange(len(images), dtype=torch.int64), read, options=options)


def from_arrays(images: np.ndarray, ids: np.ndarray | None = None, name: str = "arrays",
                options: DataOptions = DataOptions()) -> ImageSet:
    """Validate and convert raw arrays to an :class:`ImageSet` (see module docstring for the rules)."""
    images = channels_first(images, name)
    n = len(images)
    if n == 0:
        raise ProjidxError(f"data {name}: the dataset is empty")
    x = to_unit_range(images, options.value_range, name)
    if options.resize is not None and tuple(x.shape[2:]) != tuple(options.resize):
        x = _resized(ImageSet(name, torch.from_numpy(np.ascontiguousarray(x)), torch.zeros(n)), options).images.numpy()
    c, h, w = x.shape[1:]
    if c not in (1, 3) or h < 8 or w < 8:
        raise ProjidxError(f"data {name}: images must have 1 or 3 channels and be at least 8x8, got {x.shape[1:]}")
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
    return ImageSet(name, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(id_arr), options=options)
