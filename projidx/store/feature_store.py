"""The Zarr v3 feature store: projected training gradients per checkpoint, resumable and validated.

Layout (``c`` is a checkpoint id, N training samples, G stored gradients per sample, k = proj_dim)::

    STORE/zarr.json        attrs["projidx"]: StoreMeta (format version, projector spec, fingerprints, ...)
    STORE/ids              (N,) int64 sample ids
    STORE/features/<c>     (N, G, k) float16|float32  P g / ||g||: the projected *unit* gradient
    STORE/norms/<c>        (N, G) float32             ||g||, exact, over all parameters, before projection
    STORE/mean_norms/<c>   (N,) float32               ||mean_G g||, exact (for cosine; = norms when G = 1)
    STORE/timesteps/<c>    (N, G) int32               the timestep of each stored gradient
    STORE/losses/<c>       (N, G) float32             the training loss at each stored gradient's (x0, t, noise
                                                      draws), mean over draws: DAS's residual (stores whose
                                                      metadata records ``losses``; older stores lack it)
    STORE/done/<c>         (n_chunks,) uint64         row-chunk i's record: 0 = not done, else a digest of the
                                                      chunk's stored bytes with c and i (set after its data)

The projected gradient is P g = features * norms; storing the direction and the exact norm apart keeps
float16 features in range whatever the gradient scale. G = 1 in replay mode, K in grid mode. Every array
is chunked along N only, with ``chunk_rows`` rows, and carries a crc32c checksum per chunk; float arrays
are NaN-filled, so a corrupted, truncated or deleted chunk is detected on read and named. The done record
binds a chunk's content (the losses included, where the store has them) to its place (a chunk object copied into
another row-chunk or checkpoint fails it),
and the root metadata carries its own digest (an edited ``n`` or grid is refused). A store lives at a local path
or an fsspec URL (:mod:`projidx.store.locations`). A new store is created whole: locally built under a temporary name
and renamed into place, on an object store uploaded with its root metadata last, so an interrupted creation
leaves nothing that opens as a store. One writer at a time holds ``STORE.lock`` (:class:`WriterLock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from projidx.errors import ProjidxError, one_line
from projidx.features.projection import ProjectorSpec
from projidx.models.diffusion import NoiseSchedule
from projidx.store.locations import ROOT, Location

FORMAT_VERSION = 2  # 2: done records are content digests; the metadata carries a digest
READABLE_VERSIONS = (1, 2)  # version 1 stores (bool done markers, no digests) are still read


@dataclass(frozen=True)
class StoreMeta:
    """What a store was computed from. A store is resumed only if all fields but ``checkpoint_dir``,
    ``checkpoint_folders``, ``checkpoint_base``, ``dataset_name`` and ``dataset_options`` (where and how they were
    read) agree: see :meth:`difference`."""

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
    prediction: str = "epsilon"  # settings.PREDICTIONS: what the network outputs, hence the loss's target
    conditioning: dict = field(default_factory=dict)  # {model input: requirements} (diffusion.model_conditioning)
    # a pipeline's frozen parts: {component: folder digest} (models.pipeline) and "latents" (settings.LATENTS)
    encoders: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # the attributed parameters (grads.select_parameters); {}: all
    checkpoint_dir: str | None = field(default=None, compare=False)  # a projidx checkpoint directory, or
    checkpoint_folders: list[str] = field(default_factory=list, compare=False)  # diffusers folders, in order
    checkpoint_base: str | None = field(default=None, compare=False)  # LoRA folders: the base diffusers folder
    dataset_options: dict = field(default_factory=dict, compare=False)  # data.DataOptions the data was read with
    # whether the store records each stored gradient's training loss (losses/<c>); fixed when the store is created
    # (a resumed store keeps its own layout), stores written before it existed have none
    losses: bool = field(default=False, compare=False)

    @property
    def gradients_per_sample(self) -> int:
        return 1 if self.train_timesteps == "replay" else len(self.timesteps)

    @property
    def checkpoint_ids(self) -> list[str]:
        return [c["id"] for c in self.checkpoints]

    @property
    def conditioning_inputs(self) -> tuple[str, ...]:
        """The model inputs besides (x_t, t) that the data supplies (part of the dataset fingerprint)."""
        return tuple(sorted(self.conditioning))

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
            "prediction": self.prediction,
            "conditioning": self.conditioning,
            "encoders": self.encoders,
            "params": self.params,
            "checkpoint_dir": self.checkpoint_dir,
            "checkpoint_folders": self.checkpoint_folders,
            "checkpoint_base": self.checkpoint_base,
            "dataset_options": self.dataset_options,
            "losses": self.losses,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StoreMeta:
        """Parse the stored form; ProjidxError naming the field that is missing or malformed."""
        try:
            return cls._from_dict(d)
        except KeyError as e:
            raise ProjidxError(f"the store's metadata has no {e.args[0]!r} field") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise ProjidxError(f"the store's metadata is malformed ({one_line(e)})") from e

    @classmethod
    def _from_dict(cls, d: dict) -> StoreMeta:
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
            prediction=d.get("prediction", "epsilon"),
            conditioning={str(k): dict(v) for k, v in (d.get("conditioning") or {}).items()},
            encoders={str(k): str(v) for k, v in (d.get("encoders") or {}).items()},
            params=dict(d.get("params") or {}),
            checkpoint_dir=d.get("checkpoint_dir"),
            checkpoint_folders=[str(f) for f in d.get("checkpoint_folders") or []],
            checkpoint_base=d.get("checkpoint_base"),
            dataset_options=dict(d.get("dataset_options") or {}),
            losses=bool(d.get("losses", False)),
        )

    def difference(self, other: StoreMeta) -> str | None:
        """The fields (in a user's words, comma-separated) in which ``other`` differs from this, or None; short
        values are named too: ``noise policy (store: per-sample, given: shared)``."""
        names = {
            "params": "parameter selection",  # first: it changes the projector spec and the model fingerprint too
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
            "prediction": "prediction type",
            "conditioning": "conditioning",
            "encoders": "VAE / text encoder / latents",
        }
        differ = []
        for attr, label in names.items():
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if attr == "params" and _selection(mine) == _selection(theirs):
                continue  # a store from before selections were recorded attributed every parameter: "all"
            if mine != theirs:
                if attr == "params":  # named by its patterns, not its digest
                    mine, theirs = mine.get("patterns", "all"), theirs.get("patterns", "all")
                values = f" (store: {mine}, given: {theirs})"
                differ.append(label + (values if len(values) <= 80 else ""))
        return ", ".join(differ) or None


def _selection(params: dict) -> dict | str:
    """A recorded parameter selection, with "all" (or none recorded: stores written before ``--params``) as "all";
    the model fingerprint compares the parameters themselves."""
    return "all" if params.get("patterns", "all") == "all" else params


def _array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, fill) -> None:
    group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill,
        serializer=BytesCodec(),
        compressors=[Crc32cCodec()],
        overwrite=True,
    )


def expected_arrays(meta: StoreMeta) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], str, object]]:
    """{array name: (shape, chunks, dtype, fill)} of a store with ``meta``: the layout in the module docstring."""
    g, k, rows, n = meta.gradients_per_sample, meta.projector.proj_dim, meta.chunk_rows, meta.n
    n_chunks = -(-n // rows)
    out: dict[str, tuple[tuple[int, ...], tuple[int, ...], str, object]] = {"ids": ((n,), (rows,), "int64", -1)}
    for cid in meta.checkpoint_ids:
        out[f"features/{cid}"] = ((n, g, k), (rows, g, k), meta.projector.dtype, np.nan)
        out[f"norms/{cid}"] = ((n, g), (rows, g), "float32", np.nan)
        out[f"mean_norms/{cid}"] = ((n,), (rows,), "float32", np.nan)
        out[f"timesteps/{cid}"] = ((n, g), (rows, g), "int32", -1)
        if meta.losses:
            out[f"losses/{cid}"] = ((n, g), (rows, g), "float32", np.nan)
        out[f"done/{cid}"] = ((n_chunks,), (1,), "uint64", 0)
    return out


def meta_digest(attrs: dict) -> str:
    """sha256 of the stored metadata (without its own ``digest`` field), canonical JSON."""
    body = {key: value for key, value in attrs.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def chunk_digest(cid: str, chunk: int, arrays: list[np.ndarray]) -> int:
    """A non-zero 64-bit digest of one row-chunk's stored bytes, bound to its checkpoint id and chunk index."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{cid}\0{chunk}\0".encode())
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") or 1


@dataclass
class Chunk:
    """One row-chunk of one checkpoint, as float32/int arrays: rows [start, stop)."""

    features: np.ndarray  # (rows, G, k) float32, unit-gradient projections
    norms: np.ndarray  # (rows, G) float32
    mean_norms: np.ndarray  # (rows,) float32
    timesteps: np.ndarray  # (rows, G) int32
    losses: np.ndarray | None = None  # (rows, G) float32 training loss of each gradient's inputs; None: not recorded


class WriterLock:
    """The one-writer guarantee: ``featurize`` and ``index`` hold ``STORE.lock``, next to the store, for their whole
    run; a second writer gets a one-line refusal naming the holder. Under torchrun rank 0 holds it for every rank
    (:func:`projidx.features.featurization.featurize`).

    On the local file system (paths and file:// URLs) it is an exclusive advisory lock (``fcntl.flock``) on that
    file, which the kernel drops when its process ends, however it ends (kill -9 included). Object stores have no
    such lock: there ``STORE.lock`` is an object naming its holder, created only where none exists
    (:meth:`Location.create_exclusive`) and deleted on exit. A writer killed outright leaves it behind: one whose
    process is gone from this host is taken over, any other is named in the refusal, to be deleted by hand."""

    def __init__(self, store_path: str | Path | Location) -> None:
        self.store = Location.parse(store_path)
        self.lock = self.store.sibling(".lock")
        self._file = None
        self._object: str | None = None

    def __enter__(self) -> WriterLock:
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join(os.path.basename(a) if i == 0 else a
                                                 for i, a in enumerate(sys.argv[:3]))})
        if self.lock.local is not None:
            self._flock(self.lock.local, holder)
        else:
            self._create_object(holder)
        return self

    def _flock(self, path: Path, holder: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115 (held until __exit__)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            current = f.read()
            f.close()
            raise self._busy(current) from None
        f.seek(0)
        f.truncate()
        f.write(holder)
        f.flush()
        self._file = f

    def _create_object(self, holder: str) -> None:
        current = ""
        for _ in range(3):
            if self.lock.create_exclusive(holder.encode()):
                self._object = holder
                return
            try:
                current = self.lock.read_text()
            except FileNotFoundError:
                continue  # released meanwhile
            if not _died_here(current):
                break
            with contextlib.suppress(FileNotFoundError):
                if self.lock.read_text() == current:  # not taken over by another writer meanwhile
                    self.lock.unlink()  # its writer's process is gone from this host: take the lock over
        raise self._busy(current, f"; if that run is gone, delete {self.lock}")

    def _busy(self, holder: str, hint: str = "") -> ProjidxError:
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']} ...)"
        except (ValueError, TypeError, KeyError):
            who = holder.strip() or "another process"
        return ProjidxError(f"store {self.store} is being written by {who}; wait for it to finish (or stop it), then"
                            f" re-run{hint}")

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._object is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.lock.read_text() == self._object:  # still ours
                    self.lock.unlink()
            self._object = None


def _died_here(holder: str) -> bool:
    """Whether a lock object's holder was a process of this host that no longer runs."""
    try:
        h = json.loads(holder)
        if h["host"] != socket.gethostname():
            return False
        os.kill(int(h["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, TypeError, KeyError, PermissionError):
        return False
    return False


def store_exists(path: str | Path | Location) -> bool:
    """Whether ``featurize`` finds a store to resume at ``path`` rather than creating one: anything at a local path;
    on an object store a root ``zarr.json`` (objects without one are an interrupted creation, which
    :meth:`FeatureStore.create` replaces)."""
    location = Location.parse(path)
    return location.exists() if location.local is not None else (location / ROOT).exists()


class FeatureStore:
    """A feature store at a local path or an fsspec URL (``path``, a :class:`Location`). Create with
    :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: Location, group: zarr.Group, meta: StoreMeta, uuid: str, version: int = FORMAT_VERSION):
        self.path = path
        self.group = group
        self.meta = meta
        self.uuid = uuid
        self.version = version

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path | Location, meta: StoreMeta, ids: np.ndarray) -> FeatureStore:
        """Create the store's skeleton (every array's metadata, the ids, the root metadata last) whole at ``path``
        (:meth:`Location.create_zarr`): an interrupted creation leaves nothing that opens as a store."""
        location = Location.parse(path)
        if store_exists(location):
            raise ProjidxError(f"store {location} already exists")
        if ids.shape != (meta.n,):
            raise ValueError("ids must have shape (n,)")
        token = uuidlib.uuid4().hex

        def build(target) -> None:
            group = zarr.open_group(target, mode="w-", zarr_format=3)
            for name, (shape, chunks, dtype, fill) in expected_arrays(meta).items():
                _array(group, name, shape, chunks, dtype, fill)
            group["ids"][:] = ids.astype(np.int64)
            attrs = {**meta.to_dict(), "uuid": token}
            group.attrs["projidx"] = {**attrs, "digest": meta_digest(attrs)}

        location.create_zarr(build)
        return cls.open(location, mode="r+")

    @classmethod
    def open(cls, path: str | Path | Location, mode: str = "r") -> FeatureStore:
        """Open a store, checking its metadata digest and (read-only opens) that every array has the shape, chunks
        and dtype the metadata implies (ProjidxError naming what disagrees)."""
        path = Location.parse(path)
        if not (path / ROOT).is_file():
            raise ProjidxError(f"store {path}: not a projidx store (no zarr.json)")
        try:
            group = zarr.open_group(path.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
            attrs = dict(group.attrs)["projidx"]
        except KeyError as e:
            raise ProjidxError(f"store {path}: not a projidx store (no projidx metadata)") from e
        except Exception as e:
            raise ProjidxError(f"store {path}: cannot be opened ({one_line(e)})") from e
        if not isinstance(attrs, dict) or attrs.get("format_version") not in READABLE_VERSIONS:
            version = attrs.get("format_version") if isinstance(attrs, dict) else None
            raise ProjidxError(f"store {path}: format version {version} (this is {FORMAT_VERSION})")
        version = int(attrs["format_version"])
        if version >= 2 and attrs.get("digest") != meta_digest(attrs):
            raise ProjidxError(f"store {path}: its metadata does not match its digest (edited?); it cannot be trusted:"
                               f" delete it ('rm -r {path}') and re-run 'projidx featurize'")
        if "uuid" not in attrs:
            raise ProjidxError(f"store {path}: the store's metadata has no 'uuid' field")
        try:
            meta = StoreMeta.from_dict(attrs)
        except ProjidxError as e:
            raise ProjidxError(f"store {path}: {e}") from e
        store = cls(path, group, meta, attrs["uuid"], version)
        if mode == "r":  # a writer (featurize) opens "r+" and repairs instead
            store.check_arrays()
        return store

    def damaged_arrays(self) -> dict[str, str]:
        """{array name: what is wrong} for every array missing, unreadable, or not of the shape, chunks and dtype
        the metadata implies; {} for a sound store. Version 1 stores have bool done markers."""
        out = {}
        for name, (shape, chunks, dtype, _) in expected_arrays(self.meta).items():
            if self.version == 1 and name.startswith("done/"):
                dtype = "bool"
            try:
                a = self.group[name]
                got = (tuple(a.shape), tuple(a.chunks), str(a.dtype))
            except Exception as e:
                out[name] = f"unreadable ({one_line(e)})"
                continue
            if got != (shape, chunks, str(np.dtype(dtype))):
                out[name] = f"shape {got[0]}, chunks {got[1]}, dtype {got[2]}; expected {shape}, {chunks}, {dtype}"
        return out

    def check_arrays(self) -> None:
        """ProjidxError naming the first damaged array (see :meth:`damaged_arrays`)."""
        damaged = self.damaged_arrays()
        if damaged:
            name, what = next(iter(damaged.items()))
            raise ProjidxError(f"store {self.path}: array {name} is damaged: {what}; re-run 'projidx featurize' to"
                               " rebuild it")

    def repair(self, ids: np.ndarray) -> list[str]:
        """Writer-side repair (``featurize``): recreate every damaged array empty from the recorded metadata and
        rewrite ``ids`` if they differ from ``ids``. Chunks whose data was lost fail their done record and are
        recomputed. Returns what was repaired, in words."""
        repaired = []
        for name, what in self.damaged_arrays().items():
            if self.version == 1:
                raise ProjidxError(f"store {self.path}: array {name} is damaged: {what}; this version-1 store cannot"
                                   f" be repaired: delete it ('rm -r {self.path}') and re-run 'projidx featurize'")
            shape, chunks, dtype, fill = expected_arrays(self.meta)[name]
            _array(self.group, name, shape, chunks, dtype, fill)
            repaired.append(f"{name} ({what})")
        try:
            stored = np.asarray(self.group["ids"][:])
        except Exception:
            stored = None
        if stored is None or not np.array_equal(stored, ids):
            self.group["ids"][:] = ids.astype(np.int64)
            repaired.append("ids")
        return repaired

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
            raise ProjidxError(f"store {self.path}: the ids array is corrupted ({one_line(e)}); re-run"
                               " 'projidx featurize' to rewrite it") from e
        if ids.shape != (self.meta.n,) or (ids < 0).any():
            raise ProjidxError(f"store {self.path}: the ids array is missing chunks; re-run 'projidx featurize' to"
                               " rewrite it")
        return ids

    def weights(self) -> list[float]:
        return [float(c["weight"]) for c in self.meta.checkpoints]

    # ---- writing ---------------------------------------------------------------------------------
    def write_chunk(self, cid: str, chunk: int, data: Chunk) -> None:
        """Write one row-chunk's arrays, then (only then) its done record: the digest of what was written."""
        rows = self.rows(chunk)
        stored = self._as_stored(data)
        for name, values in zip(self._array_names(), stored, strict=True):
            self.group[f"{name}/{cid}"][rows] = values
        self.group[f"done/{cid}"][chunk] = chunk_digest(cid, chunk, stored) if self.version >= 2 else True

    def _array_names(self) -> tuple[str, ...]:
        """The per-checkpoint arrays a row-chunk is written to and read from, in digest order."""
        return ("features", "norms", "mean_norms", "timesteps", *(("losses",) if self.meta.losses else ()))

    def _as_stored(self, data: Chunk) -> list[np.ndarray]:
        stored = [data.features.astype(self.meta.projector.dtype), data.norms.astype(np.float32),
                  data.mean_norms.astype(np.float32), data.timesteps.astype(np.int32)]
        if self.meta.losses:
            if data.losses is None:
                raise ValueError(f"store {self.path} records losses; this chunk has none")
            stored.append(data.losses.astype(np.float32))
        return stored

    def mark_undone(self, cid: str, chunk: int) -> None:
        self.group[f"done/{cid}"][chunk] = 0

    # ---- reading ---------------------------------------------------------------------------------
    def records(self, cid: str, unreadable_as_undone: bool = False) -> np.ndarray:
        """(n_chunks,) uint64 done records of ``cid`` (bool markers of version 1 as 0/1). An unreadable record is
        an error, or 0 (not done) when ``unreadable_as_undone`` (featurize then recomputes that chunk)."""
        array = self.group[f"done/{cid}"]
        try:
            return np.asarray(array[:]).astype(np.uint64)
        except Exception as e:
            if not unreadable_as_undone:
                raise ProjidxError(f"store {self.path}: the done records of checkpoint {cid} are unreadable "
                                   f"({one_line(e)}); re-run 'projidx featurize' to repair them") from e
        out = np.zeros(self.n_chunks, np.uint64)
        for i in range(self.n_chunks):
            try:
                out[i] = int(array[i])
            except Exception:
                out[i] = 0
        return out

    def record(self, cid: str, chunk: int) -> int:
        """Row-chunk ``chunk``'s done record (0: not done), reading that record alone."""
        try:
            return int(self.group[f"done/{cid}"][chunk])
        except Exception as e:
            raise ProjidxError(f"store {self.path}: the done record of checkpoint {cid}, chunk {chunk} is unreadable"
                               f" ({one_line(e)}); re-run 'projidx featurize' to repair it") from e

    def done(self, cid: str, unreadable_as_undone: bool = False) -> np.ndarray:
        """(n_chunks,) bool: row-chunk i of ``cid`` has a done record (see :meth:`records`)."""
        try:
            return self.records(cid, unreadable_as_undone) != 0
        except ProjidxError:
            raise
        except Exception as e:
            raise ProjidxError(f"store {self.path}: the done records of checkpoint {cid} are unreadable "
                               f"({one_line(e)}); re-run 'projidx featurize' to repair them") from e

    def is_complete(self) -> bool:
        return all(self.done(cid).all() for cid in self.meta.checkpoint_ids)

    def read_chunk(self, cid: str, chunk: int, record: int | None = None) -> Chunk:
        """Read and validate one row-chunk against its done record; raises ProjidxError naming it if it is
        incomplete, corrupted, or not the content its record was made for."""
        rows = self.rows(chunk)
        where = f"store {self.path}: checkpoint {cid}, rows {rows.start}-{rows.stop - 1} (chunk {chunk})"
        if record is None:
            record = self.record(cid, chunk)
        if not record:
            raise ProjidxError(f"{where} is not featurized yet; run 'projidx featurize' on this store")
        try:
            stored = [np.asarray(self.group[f"{name}/{cid}"][rows]) for name in self._array_names()]
        except Exception as e:
            raise ProjidxError(
                f"{where} is corrupted ({type(e).__name__}: {one_line(e)}); re-run 'projidx featurize' to recompute it"
            ) from e
        if self.version >= 2 and chunk_digest(cid, chunk, stored) != record:
            raise ProjidxError(f"{where} does not match its done record (moved, replaced or edited); re-run"
                               " 'projidx featurize' to recompute it")
        data = Chunk(features=stored[0].astype(np.float32), norms=stored[1], mean_norms=stored[2],
                     timesteps=stored[3], losses=stored[4] if self.meta.losses else None)
        finite = np.isfinite(data.features).all() and np.isfinite(data.norms).all()
        if data.losses is not None:
            finite = finite and bool(np.isfinite(data.losses).all())
        if not finite or not np.isfinite(data.mean_norms).all() or (data.timesteps < 0).any():
            raise ProjidxError(f"{where} is missing or truncated; re-run 'projidx featurize' to recompute it")
        return data

    def norms(self, cid: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, G) exact gradient norms and (N, G) their timesteps at ``cid`` (every chunk validated against its
        done record); ProjidxError if the checkpoint is not completely featurized or the arrays are damaged."""
        if not self.done(cid).all():
            raise ProjidxError(f"store {self.path}: checkpoint {cid} is not completely featurized")
        parts = [self.read_chunk(cid, i) for i in range(self.n_chunks)]
        return np.concatenate([p.norms for p in parts]), np.concatenate([p.timesteps for p in parts])

    def chunks(self, cid: str) -> Iterator[tuple[slice, Chunk]]:
        records = self.records(cid)
        for chunk in range(self.n_chunks):
            yield self.rows(chunk), self.read_chunk(cid, chunk, int(records[chunk]))

    def nbytes_on_disk(self) -> int:
        return self.path.nbytes()
