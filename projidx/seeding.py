"""Seeds derived from named parts, never from device properties, thread counts or parameter order."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from an ordered tuple of ints and strings (blake2b; stable across machines)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        tag = b"i" if isinstance(part, int) else b"s"
        data = str(part).encode()
        h.update(tag + len(data).to_bytes(4, "little") + data)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed` (CPU streams are identical everywhere)."""
    return torch.Generator().manual_seed(derive_seed(*parts))
