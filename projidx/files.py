"""Files written whole or not at all, and content digests (I/O helpers shared by the writing modules)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from projidx.errors import ProjidxError, one_line


def stream_sha256(f: BinaryIO) -> str:
    """sha256 of the rest of an open binary file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        return stream_sha256(f)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` (an earlier file there is
    replaced only then), on any error it is removed. Readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; ProjidxError starting with ``what`` if it is unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProjidxError(f"{what}: cannot read {path} ({one_line(e)})") from e
    if not isinstance(value, dict):
        raise ProjidxError(f"{what}: {path} must hold a JSON object")
    return value
