"""The ranks of a run, from torchrun's environment, and the few collectives the loop needs.

torchrun (or ``hellbender train --nproc-per-node N``, which starts it) sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`process_group` joins them with
NCCL on CUDA and gloo on CPU. Every collective has the process group's timeout (``ddp_timeout``),
so a rank that dies or hangs fails the others in bounded time instead of blocking them forever.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) gets ``World()``: rank 0 of 1, every
collective the identity, no process group at all.

Context parallelism (``context_parallel_size`` cp > 1) arranges the W ranks as dp × cp: adjacent
ranks form a CP group (rank = dp_rank × cp + cp_rank), which shares one micro-batch and splits its
sequence; :attr:`World.cp_group` is this rank's group. Data is dealt by ``dp_rank`` over
``dp_size``; every other reduction (token counts, gradients) stays over all W ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from hellbender.errors import HellbenderError

logger = logging.getLogger(__name__)


class RankFailedError(HellbenderError, RuntimeError):
    """Another rank failed in a step every rank takes together; its own message says why."""


@dataclass(frozen=True)
class World:
    """The ranks taking part. Single-process defaults; :func:`process_group` supplies real ones."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    cp_size: int = 1  # ranks sharing one sequence (context parallelism); divides size
    cp_group: Any = field(default=None, compare=False)  # this rank's CP ProcessGroup (None: cp_size 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Ranks that see different data: ``size ÷ cp_size``."""
        return self.size // self.cp_size

    @property
    def dp_rank(self) -> int:
        """Which data-parallel share this rank trains (the same for every rank of a CP group)."""
        return self.rank // self.cp_size

    @property
    def cp_rank(self) -> int:
        """This rank's position in its CP group: which part of each sequence it holds."""
        return self.rank % self.cp_size

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_reduce_sum(self, value: float) -> float:
        """``value`` summed over the ranks (float64 on the wire: token counts stay exact)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_flag(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (the others' argument is ignored)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=_collective_device())
        dist.broadcast(t, src=0)
        return int(t.item())

    @contextlib.contextmanager
    def main_first(self, what: str) -> Iterator[None]:
        """Run the block on rank 0 first, then on the others (which find, say, rank 0's cache).

        If rank 0 fails, the others do not wait for a timeout: they learn it from the broadcast
        that ends rank 0's turn and raise :class:`RankFailedError` at once; rank 0's own error is
        the one the user reads.
        """
        if self.size == 1:
            yield
            return
        if self.is_main:
            try:
                yield
            except BaseException:
                self.broadcast_flag(1)
                raise
            self.broadcast_flag(0)
        else:
            if self.broadcast_flag(0):
                raise RankFailedError(f"rank 0 failed during {what}; its message says why")
            yield


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun set them; (0, 1, 0) outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    return rank, size, local


@contextlib.contextmanager
def process_group(timeout_seconds: float, context_parallel_size: int = 1) -> Iterator[World]:
    """Join torchrun's ranks for the block (NCCL on CUDA, gloo on CPU); ``World()`` alone.

    ``timeout_seconds`` bounds every collective (gloo and NCCL both honour it), so a peer that
    died makes the survivors fail instead of hang. ``context_parallel_size`` > 1 also builds the
    CP groups (:func:`context_parallel_world`).
    """
    rank, size, local_rank = world_from_env()
    if size == 1:
        yield World()
        return
    import torch.distributed as dist

    if dist.is_initialized():  # a caller (a test, a notebook) set it up: use it, leave it up
        yield context_parallel_world(
            World(dist.get_rank(), dist.get_world_size(), local_rank), context_parallel_size
        )
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds))
    try:
        yield context_parallel_world(World(rank, size, local_rank), context_parallel_size)
    finally:
        dist.destroy_process_group()


def context_parallel_world(world: World, cp_size: int) -> World:
    """``world`` with its CP groups: ranks ``[k·cp, (k+1)·cp)`` share a sequence (adjacent ranks,
    so on a multi-GPU node the ring's traffic stays on the fastest links). A collective: every
    rank builds every group, in the same order, as ``new_group`` requires."""
    if cp_size == 1:
        return world
    if cp_size < 1 or world.size % cp_size:
        raise ValueError(f"context_parallel_size {cp_size} does not divide the {world.size} ranks")
    import torch.distributed as dist

    mine = None
    for first in range(0, world.size, cp_size):
        group = dist.new_group(list(range(first, first + cp_size)))
        if first <= world.rank < first + cp_size:
            mine = group
    return World(world.rank, world.size, world.local_rank, cp_size, mine)


def rank_device(world: World) -> torch.device:
    """The device of this rank: its GPU (``LOCAL_RANK``) on a CUDA machine, else the CPU."""
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
