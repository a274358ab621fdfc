"""The Zarr v3 feature store: projected training gradients per checkpoint, resumable and validated.

Layout (``c`` is a checkpoint id, N training samples, G stored gradients per sample, k = proj_dim)::

    STORE/zarr.json        attrs["projidx"]: StoreMeta (format version, projector spec, fingerprints, ...)
    STORE/ids              (N,) int64 sample ids
    STORE/features/<c>     (N, G, k) float16|float32  P g / ||g||: the projected *unit* gradient
    STORE/norms/<c>        (N, G) float32             ||g||, exact, over all parameters, before projection
    STORE/mean_norms/<c>   (N,) float32               ||mean_G g||, exact (for cosine; = norms when G = 1)
    STORE/timesteps/<c>    (N, G) int32               the timestep of each stored gradient
    STORE/done/<c>         (n_chunks,) bool           row-chunk i complete (set only after its data)

The projected gradient is P g = features * norms; storing the direction and the exact norm apart keeps
float16 features in range whatever the gradient scale. G = 1 in replay mode, K in grid mode. Every array
is chunked along N only, with ``chunk_rows`` rows, and carries a crc32c checksum per chunk; float arrays
are NaN-filled, so a corrupted, truncated or deleted chunk is detected on read and named.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from projidx.diffusion import NoiseSchedule
from projidx.errors import ProjidxError, one_line
from projidx.projection import ProjectorSpec

FORMAT_VERSION = 1
MODES = ("replay", "grid")


@dataclass(frozen=True)
class StoreMeta:
    """What a store was computed from. A store is resumed only if all fields but ``checkpoint_dir`` and
    ``dataset_name`` (where they were read from) agree: see :meth:`difference`."""

    projector: ProjectorSpec
    model_fingerprint: str
    dataset_fingerprint: str
    dataset_name: str
    n: int
    image_shape: tuple[int, int, int]
    checkpoints: list[dict]  # [{"id", "sha256", "weight"}]
    loss: str
    schedule: NoiseSchedule
    train_timesteps: str  # replay | grid
    timesteps: list[int]  # grid mode: the grid; replay mode: []
    noise_seed: int
    chunk_rows: int
    objective: str = "loss"  # "loss" (the paper) or "dtrak" (D-TRAK's mean squared model output)
    train_draws: int = 1  # noise draws averaged per training-side gradient
    noise: str = "per-sample"  # diffusion.NOISE_POLICIES; stores written before the policy existed are per-sample
    checkpoint_dir: str | None = field(default=None, compare=False)

    @property
    def gradients_per_sample(self) -> int:
        return 1 if self.train_timesteps == "replay" else len(self.timesteps)

    @property
    def checkpoint_ids(self) -> list[str]:
        return [c["id"] for c in self.checkpoints]

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "projector": self.projector.to_dict(),
            "model_fingerprint": self.model_fingerprint,
            "dataset_fingerprint": self.dataset_fingerprint,
            "dataset_name": self.dataset_name,
            "n": self.n,
            "image_shape": list(self.image_shape),
            "checkpoints": self.checkpoints,
            "loss": self.loss,
            "schedule": self.schedule.to_dict(),
            "train_timesteps": self.train_timesteps,
            "timesteps": self.timesteps,
            "noise_seed": self.noise_seed,
            "chunk_rows": self.chunk_rows,
            "objective": self.objective,
            "train_draws": self.train_draws,
            "noise": self.noise,
            "checkpoint_dir": self.checkpoint_dir,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StoreMeta:
        return cls(
            projector=ProjectorSpec.from_dict(d["projector"]),
            model_fingerprint=d["model_fingerprint"],
            dataset_fingerprint=d["dataset_fingerprint"],
            dataset_name=d["dataset_name"],
            n=int(d["n"]),
            image_shape=tuple(d["image_shape"]),  # type: ignore[arg-type]
            checkpoints=[dict(c) for c in d["checkpoints"]],
            loss=d["loss"],
            schedule=NoiseSchedule.from_dict(d["schedule"]),
            train_timesteps=d["train_timesteps"],
            timesteps=[int(t) for t in d["timesteps"]],
            noise_seed=int(d["noise_seed"]),
            chunk_rows=int(d["chunk_rows"]),
            objective=d.get("objective", "loss"),
            train_draws=int(d.get("train_draws", 1)),
            noise=d.get("noise", "per-sample"),
            checkpoint_dir=d.get("checkpoint_dir"),
        )

    def difference(self, other: StoreMeta) -> str | None:
        """The fields (in a user's words, comma-separated) in which ``other`` differs from this, or None; short
        values are named too: ``noise policy (store: per-sample, given: shared)``."""
        names = {
            "projector": "projector spec",
            "model_fingerprint": "model",
            "dataset_fingerprint": "dataset",
            "n": "dataset size",
            "image_shape": "image shape",
            "checkpoints": "checkpoints",
            "loss": "loss",
            "schedule": "noise schedule",
            "train_timesteps": "training-side timestep mode",
            "timesteps": "timesteps",
            "noise_seed": "noise seed",
            "chunk_rows": "chunk size",
            "objective": "objective",
            "train_draws": "training-side noise draws",
            "noise": "noise policy",
        }
        differ = []
        for attr, label in names.items():
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if mine != theirs:
                values = f" (store: {mine}, given: {theirs})"
                differ.append(label + (values if len(values) <= 80 else ""))
        return ", ".join(differ) or None


def _array(group: zarr.Group, name: str, shape: tuple[int, ...], chunk_rows: int, dtype: str, fill) -> None:
    group.create_array(
        name,
        shape=shape,
        chunks=(chunk_rows, *shape[1:]),
        dtype=dtype,
        fill_value=fill,
        serializer=BytesCodec(),
        compressors=[Crc32cCodec()],
    )


@dataclass
class Chunk:
    """One row-chunk of one checkpoint, as float32/int arrays: rows [start, stop)."""

    features: np.ndarray  # (rows, G, k) float32, unit-gradient projections
    norms: np.ndarray  # (rows, G) float32
    mean_norms: np.ndarray  # (rows,) float32
    timesteps: np.ndarray  # (rows, G) int32


class FeatureStore:
    """A feature store on disk. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: Path, group: zarr.Group, meta: StoreMeta, uuid: str) -> None:
        self.path = path
        self.group = group
        self.meta = meta
        self.uuid = uuid

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, meta: StoreMeta, ids: np.ndarray) -> FeatureStore:
        path = Path(path)
        if path.exists():
            raise ProjidxError(f"store {path} already exists")
        if ids.shape != (meta.n,):
            raise ValueError("ids must have shape (n,)")
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        token = uuidlib.uuid4().hex
        g, k, rows = meta.gradients_per_sample, meta.projector.proj_dim, meta.chunk_rows
        n_chunks = -(-meta.n // rows)
        _array(group, "ids", (meta.n,), rows, "int64", -1)
        group["ids"][:] = ids.astype(np.int64)
        for cid in meta.checkpoint_ids:
            _array(group, f"features/{cid}", (meta.n, g, k), rows, meta.projector.dtype, np.nan)
            _array(group, f"norms/{cid}", (meta.n, g), rows, "float32", np.nan)
            _array(group, f"mean_norms/{cid}", (meta.n,), rows, "float32", np.nan)
            _array(group, f"timesteps/{cid}", (meta.n, g), rows, "int32", -1)
            _array(group, f"done/{cid}", (n_chunks,), 1, "bool", False)
        group.attrs["projidx"] = {**meta.to_dict(), "uuid": token}
        return cls(path, group, meta, token)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise ProjidxError(f"store {path}: not a projidx store (no zarr.json)")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
            attrs = dict(group.attrs)["projidx"]
        except KeyError as e:
            raise ProjidxError(f"store {path}: not a projidx store (no projidx metadata)") from e
        except Exception as e:
            raise ProjidxError(f"store {path}: cannot be opened ({one_line(e)})") from e
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ProjidxError(f"store {path}: format version {attrs.get('format_version')} (this is {FORMAT_VERSION})")
        return cls(path, group, StoreMeta.from_dict(attrs), attrs["uuid"])

    # ---- geometry --------------------------------------------------------------------------------
    @property
    def n_chunks(self) -> int:
        return -(-self.meta.n // self.meta.chunk_rows)

    def rows(self, chunk: int) -> slice:
        start = chunk * self.meta.chunk_rows
        return slice(start, min(start + self.meta.chunk_rows, self.meta.n))

    def ids(self) -> np.ndarray:
        """(N,) int64 sample ids; raises ProjidxError if the array is corrupted or incomplete."""
        try:
            ids = np.asarray(self.group["ids"][:])
        except Exception as e:
            raise ProjidxError(f"store {self.path}: the ids array is corrupted ({one_line(e)})") from e
        if (ids < 0).any():
            raise ProjidxError(f"store {self.path}: the ids array is missing chunks")
        return ids

    def weights(self) -> list[float]:
        return [float(c["weight"]) for c in self.meta.checkpoints]

    # ---- writing ---------------------------------------------------------------------------------
    def write_chunk(self, cid: str, chunk: int, data: Chunk) -> None:
        """Write one row-chunk's arrays, then (only then) mark it done."""
        rows = self.rows(chunk)
        self.group[f"features/{cid}"][rows] = data.features.astype(self.meta.projector.dtype)
        self.group[f"norms/{cid}"][rows] = data.norms.astype(np.float32)
        self.group[f"mean_norms/{cid}"][rows] = data.mean_norms.astype(np.float32)
        self.group[f"timesteps/{cid}"][rows] = data.timesteps.astype(np.int32)
        self.group[f"done/{cid}"][chunk] = True

    def mark_undone(self, cid: str, chunk: int) -> None:
        self.group[f"done/{cid}"][chunk] = False

    # ---- reading ---------------------------------------------------------------------------------
    def done(self, cid: str) -> np.ndarray:
        """(n_chunks,) bool done markers of checkpoint ``cid``; ProjidxError if they cannot be read."""
        try:
            return np.asarray(self.group[f"done/{cid}"][:], dtype=bool)
        except Exception as e:
            raise ProjidxError(f"store {self.path}: the done markers of checkpoint {cid} are unreadable "
                               f"({one_line(e)}); re-run 'projidx featurize'") from e

    def is_complete(self) -> bool:
        return all(self.done(cid).all() for cid in self.meta.checkpoint_ids)

    def read_chunk(self, cid: str, chunk: int) -> Chunk:
        """Read and validate one row-chunk; raises ProjidxError naming it if it is incomplete or corrupted."""
        rows = self.rows(chunk)
        where = f"store {self.path}: checkpoint {cid}, rows {rows.start}-{rows.stop - 1} (chunk {chunk})"
        if not self.done(cid)[chunk]:
            raise ProjidxError(f"{where} is not featurized yet; run 'projidx featurize' on this store")
        try:
            data = Chunk(
                features=np.asarray(self.group[f"features/{cid}"][rows], dtype=np.float32),
                norms=np.asarray(self.group[f"norms/{cid}"][rows]),
                mean_norms=np.asarray(self.group[f"mean_norms/{cid}"][rows]),
                timesteps=np.asarray(self.group[f"timesteps/{cid}"][rows]),
            )
        except Exception as e:
            raise ProjidxError(
                f"{where} is corrupted ({type(e).__name__}: {one_line(e)}); re-run 'projidx featurize' to recompute it"
            ) from e
        finite = np.isfinite(data.features).all() and np.isfinite(data.norms).all()
        if not finite or not np.isfinite(data.mean_norms).all() or (data.timesteps < 0).any():
            raise ProjidxError(f"{where} is missing or truncated; re-run 'projidx featurize' to recompute it")
        return data

    def norms(self, cid: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, G) exact gradient norms and (N, G) their timesteps at ``cid``, without reading the features;
        ProjidxError if the checkpoint is not completely featurized or the arrays are damaged."""
        if not self.done(cid).all():
            raise ProjidxError(f"store {self.path}: checkpoint {cid} is not completely featurized")
        try:
            norms = np.asarray(self.group[f"norms/{cid}"][:])
            times = np.asarray(self.group[f"timesteps/{cid}"][:])
        except Exception as e:
            raise ProjidxError(f"store {self.path}: the norms of checkpoint {cid} are corrupted ({one_line(e)});"
                               " re-run 'projidx featurize' to recompute them") from e
        if not np.isfinite(norms).all() or (times < 0).any():
            raise ProjidxError(f"store {self.path}: the norms of checkpoint {cid} are missing or truncated;"
                               " re-run 'projidx featurize' to recompute them")
        return norms, times

    def chunks(self, cid: str) -> Iterator[tuple[slice, Chunk]]:
        for chunk in range(self.n_chunks):
            yield self.rows(chunk), self.read_chunk(cid, chunk)

    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
