"""Ranks of a distributed featurization (``torchrun``): who this process is, the process group, and the split.

``torchrun --nproc-per-node W -m projidx featurize ...`` starts W processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in their environment. :func:`process_group` reads them and, when W > 1
and no process group exists yet, starts one (gloo on CPU, NCCL on CUDA) with a timeout, so that a rank waiting
for a dead or stuck peer stops with an error instead of waiting forever. Featurization calls nothing in
``torch.distributed`` itself: it asks a :class:`World` to run a step on rank 0, to share lists, to wait for
every rank, and which units of work are its own (:meth:`World.share`: unit j of a list every rank agrees on goes
to rank j mod W).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from projidx.errors import ProjidxError, one_line

T = TypeVar("T")
TIMEOUT_ENV = "PROJIDX_DIST_TIMEOUT"  # seconds a rank waits for the others at a collective step
DEFAULT_TIMEOUT_S = 1800.0


class PeerError(ProjidxError):
    """Raised on the other ranks when rank 0's step failed (:meth:`World.on_main`), with its message; rank 0
    raises the error itself, and the CLI prints the line there only."""


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` ranks (``size`` 1: a plain one-process run; every step is local)."""

    rank: int = 0
    size: int = 1
    local_size: int = 1  # ranks on this machine (they share its memory)

    def share(self, units: list[T]) -> list[T]:
        """This rank's units of ``units`` (a list in the same order on every rank): units rank, rank + W, ..."""
        return units[self.rank :: self.size]

    def device(self, device: str) -> str:
        """The device this rank computes on: a bare ``cuda`` is this rank's own GPU (``cuda:LOCAL_RANK``)."""
        if self.size > 1 and device == "cuda":
            return f"cuda:{_env_int('LOCAL_RANK', self.rank)}"
        return device

    def on_main(self, step: Callable[[], T]) -> T | None:
        """Run ``step`` on rank 0 alone; every rank learns whether it failed (rank 0 re-raises its error, the
        others raise :class:`PeerError` with its message). Returns ``step``'s result on rank 0, None elsewhere."""
        if self.size == 1:
            return step()
        if self.rank == 0:
            try:
                result = step()
            except Exception as e:
                self._collective(self._broadcast, one_line(e, limit=1000))
                raise
            self._collective(self._broadcast, None)
            return result
        error = self._collective(self._broadcast, None)
        if error is not None:
            raise PeerError(f"rank 0 failed: {error}")
        return None

    def gather(self, items: list[T]) -> list[list[T]]:
        """Every rank's ``items``, in rank order (on every rank)."""
        if self.size == 1:
            return [items]
        return self._collective(self._all_gather, items)

    def barrier(self) -> None:
        """Return when every rank has reached this point."""
        if self.size > 1:
            self._collective(lambda _: _dist().barrier(), None)

    def _collective(self, op: Callable[[object], T], value: object) -> T:
        try:
            return op(value)
        except RuntimeError as e:  # a timeout, or a peer that went away (its own error is reported there)
            raise ProjidxError(f"rank {self.rank}: lost the other ranks ({one_line(e)}); re-run the same command"
                               " to resume (finished chunks are kept)") from e

    @staticmethod
    def _broadcast(value: object) -> object:
        box = [value]
        _dist().broadcast_object_list(box, src=0)
        return box[0]

    def _all_gather(self, value: object) -> list:
        out: list = [None] * self.size
        _dist().all_gather_object(out, value)
        return out


def _dist():
    import torch.distributed

    return torch.distributed


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ProjidxError(f"environment variable {name} must be an integer, got {value!r}") from None


def timeout() -> timedelta:
    """How long a rank waits for the others at a collective step: ``$PROJIDX_DIST_TIMEOUT`` seconds (default 30
    minutes; it must cover rank 0's store checks at start-up and one chunk's difference in finishing times)."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ProjidxError(f"environment variable {TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def world_from_env() -> World:
    """This process's :class:`World` from the launcher's environment (``torchrun``), or a one-process world."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ProjidxError(f"environment variables RANK={rank} and WORLD_SIZE={size} are not a rank of a world")
    return World(rank, size, _env_int("LOCAL_WORLD_SIZE", size))


@contextmanager
def process_group(device: str) -> Iterator[World]:
    """This process's :class:`World`. With W > 1 ranks and no process group yet, one is started for the block
    (gloo for a CPU ``device``, NCCL for CUDA; :func:`timeout`) and destroyed after it; a process group the caller
    started is used as it is."""
    world = world_from_env()
    dist = _dist() if world.size > 1 else None
    if dist is None or dist.is_initialized():
        if dist is not None:
            world = World(dist.get_rank(), dist.get_world_size(), world.local_size)
        yield world
        return
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.set_device(torch.device(world.device(device)))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout())
    except (RuntimeError, ValueError) as e:
        raise ProjidxError(f"rank {world.rank}: cannot start the process group of {world.size} ranks"
                           f" ({one_line(e)})") from e
    try:
        yield world
    finally:
        dist.destroy_process_group()
