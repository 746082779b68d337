"""Training on several processes with PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun --nproc-per-node N -m stad fit-students ...`` starts N copies of the command; torchrun
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each, and
:func:`init_world` joins them into one process group (gloo on CPU, NCCL on CUDA, each rank on GPU
``LOCAL_RANK``). Without those variables a run is a world of one and nothing here does any
communication, so a single-process run needs no launcher and no other flags.

In a world of N: every rank reads its shard of the training images (:meth:`World.shard`), the
gradients are averaged by DDP, statistics over all images (the teacher's descriptor
normalization) are summed across ranks, decisions that must be unanimous (stop on a signal, a
non-finite loss) are agreed with :meth:`World.any`, and only rank 0 writes artifacts,
checkpoints and the lock file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from stad import console
from stad.errors import UsageError

T = TypeVar("T")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = timedelta(minutes=30)  # a rank this far behind the others is taken as lost


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run (``size`` 1: a plain run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and reports progress."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``size``-th one from position ``rank``."""
        return list(items[self.rank::self.size])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all ranks (in place; the same tensor on one rank)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device | None = None) -> bool:
        """Whether ``flag`` is true on at least one rank (every rank gets the same answer)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (in place)."""
        if self.size > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a string or number), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


SINGLE = World()


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up, if any; returns the world and this rank's device.

    Raises:
        UsageError: ``WORLD_SIZE`` > 1 without the rest of torchrun's variables, or the group
            cannot be formed (naming what to check).
    """
    size = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if size <= 1:
        return SINGLE, device
    missing = [name for name in ENV if not os.environ.get(name)]
    if missing:
        raise UsageError(f"WORLD_SIZE={size} is set but {', '.join(missing)} is not: start "
                         "distributed runs with `torchrun --nproc-per-node N -m stad ...`")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise UsageError(f"cannot join the {backend} process group at "
                             f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: "
                             f"{str(exc).splitlines()[0]}") from None
    world = World(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    if not world.main:
        console.state.follower = True  # rank 0 speaks for the run
    return world, device


def leave_world(world: World) -> None:
    """Tear the process group down at the end of a run (nothing for a world of one)."""
    if world.size > 1 and dist.is_initialized():
        # Every rank arrives before any tears its connections down: rank 0 may still be
        # writing the artifact, and a peer closing early aborted a gloo process in testing.
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """:func:`init_world` for the duration of a block, and :func:`leave_world` after it."""
    world, device = init_world(device)
    try:
        yield world, device
    finally:
        leave_world(world)
