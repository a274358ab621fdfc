"""Where stores and their indices live: a local path or an fsspec URL.

A location is a local path (``feats.zarr``) or a URL fsspec understands: ``file:///data/feats.zarr``,
``memory://feats.zarr`` (this process only: tests), ``s3://bucket/feats.zarr`` (needs ``s3fs``),
``gs://bucket/feats.zarr`` (needs ``gcsfs``). This module is the one place that turns such a string into a Zarr
store (a local path: Zarr's own local store, as before; a URL: ``zarr.storage.FsspecStore``) and does the few
file system operations a store needs besides Zarr's: whole-file reads and writes, listing, exclusive creation
(the writer lock on object stores) and the creation of a new hierarchy.

What is atomic where. The local file system (paths and ``file://`` URLs) renames: a new store is built under a
temporary name and renamed into place, a file is written to a temporary name and renamed. Object stores have no
rename and no directories; what they guarantee is that one object is written whole (a reader sees the old object
or the new one, never part of one). There a new store is uploaded object by object with its root ``zarr.json``
last, so nothing opens as a store before it is complete, and a creation marker tells an interrupted creation's
leftovers (replaced by the next creation) from objects projidx did not write (refused). A file written "whole"
on an object store is one object.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from projidx.errors import ProjidxError, one_line
from projidx.files import atomic_path, stream_sha256

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # a scheme of two characters or more: never a Windows drive
ROOT = "zarr.json"  # a Zarr v3 hierarchy's root metadata
CREATING = ".projidx-creating"  # on an object store: a hierarchy being created (removed once it is complete)


@dataclass(frozen=True)
class Location:
    """A file or directory on the local file system or behind an fsspec URL; ``str()`` is its spelling as given."""

    text: str
    fs: Any  # the fsspec file system
    path: str  # the file system's own path
    local: Path | None  # the local path where the file system is the local one (paths and file:// URLs)

    @classmethod
    def parse(cls, where: str | Path | Location) -> Location:
        """The location of a store given as a local path or an fsspec URL; ProjidxError for a URL fsspec cannot
        reach (unknown scheme, its package not installed) or a bucket's root."""
        if isinstance(where, Location):
            return where
        text = str(where)
        scheme = URL.match(text)
        if scheme is None:
            text = str(Path(text))
            return cls(text, LocalFileSystem(), os.path.abspath(text), Path(text))
        text = scheme.group() + (text[scheme.end():].rstrip("/") or text[scheme.end():])
        try:
            fs, path = fsspec.url_to_fs(text)
        except (ImportError, ValueError) as e:
            raise ProjidxError(f"store {text}: fsspec cannot open it ({one_line(e)})") from e
        if not posixpath.dirname(path.rstrip("/")):
            raise ProjidxError(f"store {text}: name a folder inside the bucket (e.g. s3://bucket/feats.zarr), not"
                               " its root: the lock and the indices live next to the store")
        return cls(text, fs, path, Path(path) if isinstance(fs, LocalFileSystem) else None)

    def __str__(self) -> str:
        return self.text

    def __fspath__(self) -> str:
        """A local location is a path like any other (``open``, ``Path(...)``, ``shutil``); a URL is not."""
        if self.local is None:
            raise TypeError(f"{self.text} is not on the local file system")
        return str(self.local)

    @property
    def is_url(self) -> bool:
        return URL.match(self.text) is not None

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> Location:
        return replace(self, text=self.text.rsplit("/", 1)[0] if self.is_url else str(Path(self.text).parent),
                       path=posixpath.dirname(self.path), local=None if self.local is None else self.local.parent)

    def __truediv__(self, name: str) -> Location:
        return replace(self, text=f"{self.text}/{name}", path=f"{self.path}/{name}",
                       local=None if self.local is None else self.local / name)

    def sibling(self, suffix: str) -> Location:
        """``NAME + suffix`` next to this location (``feats.zarr`` -> ``feats.zarr.lock``)."""
        return replace(self, text=self.text + suffix, path=self.path + suffix,
                       local=None if self.local is None else self.local.with_name(self.local.name + suffix))

    # ---- whole files ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        """A file or directory here (on an object store: any object under this prefix)."""
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Whole or not at all: a temporary file renamed into place (local), one object (object stores)."""
        if self.local is None:
            self.fs.pipe_file(self.path, data)
            return
        with atomic_path(self.local) as tmp:
            tmp.write_bytes(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def create_exclusive(self, data: bytes) -> bool:
        """Write ``data`` here only if nothing is here yet (False if something is): fsspec's exclusive creation
        (``mode="xb"``: an ``O_EXCL`` open locally, a conditional PUT on object stores whose fsspec package
        implements it); a file system without it is checked, then written, which two writers starting at the same
        moment can both pass."""
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no exclusive mode in this file system
            if self.exists():
                return False
            self.fs.pipe_file(self.path, data)
        return True

    def unlink(self) -> None:
        self.fs.rm_file(self.path)

    def glob(self, pattern: str) -> list[Location]:
        """The entries of this directory whose names match ``pattern``, sorted by name."""
        return [self / posixpath.basename(p) for p in sorted(self.fs.glob(f"{self.path}/{pattern}"))]

    def sha256(self) -> str:
        """sha256 of the file's bytes, streamed."""
        with self.fs.open(self.path, "rb") as f:
            return stream_sha256(f)

    def nbytes(self) -> int:
        """Bytes of every file under this directory."""
        return int(self.fs.du(self.path))

    # ---- directories of files made locally -------------------------------------------------------------
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A local directory to write this directory's new files in: the directory itself (created) when it is
        local, else a temporary one whose files :meth:`commit` uploads."""
        if self.local is not None:
            self.local.mkdir(exist_ok=True)
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="projidx-") as tmp:
            yield Path(tmp)

    def commit(self, staged: Path) -> None:
        """Make a file written in :meth:`staging` appear in this directory (one upload; nothing to do locally)."""
        if self.local is None:
            self.fs.put_file(str(staged), f"{self.path}/{staged.name}")

    # ---- Zarr ------------------------------------------------------------------------------------------
    def zarr_store(self, read_only: bool) -> Any:
        """What ``zarr.open_group`` opens: the path itself for a local path (Zarr's local store), an
        ``FsspecStore`` for a URL."""
        if not self.is_url:
            return str(self.local)
        from zarr.storage import FsspecStore

        local = {"auto_mkdir": True} if self.local is not None else None  # file://: chunk folders as needed
        return FsspecStore.from_url(self.text, storage_options=local, read_only=read_only)

    def create_zarr(self, build: Callable[[Any], None]) -> None:
        """Create a new Zarr hierarchy here with ``build(store)``, as atomically as the file system allows.

        Locally it is built under ``.NAME.creating-<uuid>`` next to this location and renamed into place (an
        interrupted creation leaves nothing here; the next creation removes the leftover). On an object store it
        is built in memory, then uploaded behind a creation marker with the root ``zarr.json`` last: an
        interrupted creation leaves objects that do not open as a store, and the next creation replaces them.
        Objects here without the marker or a root ``zarr.json`` were not left by projidx: refused. The caller
        checks first that no hierarchy is here."""
        if self.local is not None:
            for stale in self.local.parent.glob(f".{self.local.name}.creating-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = self.local.with_name(f".{self.local.name}.creating-{uuid.uuid4().hex}")
            build(str(tmp))
            os.rename(tmp, self.local)
            return
        from zarr.storage import MemoryStore

        marker = self / CREATING
        if self.exists():
            if not marker.exists():
                raise ProjidxError(f"store {self}: holds objects but no {ROOT} (not a projidx store); delete them"
                                   " or choose another --store")
            self.fs.rm(self.path, recursive=True)  # an interrupted creation's leftovers
        marker.write_bytes(b"")
        objects: dict = {}
        build(MemoryStore(store_dict=objects))
        root = objects.pop(ROOT)
        self.fs.pipe({f"{self.path}/{key}": value.to_bytes() for key, value in objects.items()})
        (self / ROOT).write_bytes(root.to_bytes())
        marker.unlink()
