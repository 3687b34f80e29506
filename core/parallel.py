"""Tensor parallelism's plumbing: a `Communicator` over torch.distributed, and a rank's `ParallelContext`."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from tokenmill.interfaces import Communicator, TensorParallelPlan


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a process group meet, and how long one of its collectives may wait."""

    store: dist.Store
    timeout: timedelta


# The rendezvous `core/shard.py` has already completed for the communicator the backend is about to
# build: the `tokenmill_communicator` hook chooses the collective library but is not given the store.
_JOINING: ContextVar[Rendezvous | None] = ContextVar("tokenmill_rendezvous", default=None)


@contextmanager
def joining(rendezvous: Rendezvous) -> Iterator[None]:
    """Communicators built inside this block create their process group over `rendezvous`."""
    token = _JOINING.set(rendezvous)
    try:
        yield
    finally:
        _JOINING.reset(token)


class TorchDistributedCommunicator(Communicator):
    """Collectives through a torch.distributed backend ("gloo", "nccl", "xccl", ...).

    With one rank every collective is the identity and no process group is created, so a single
    process never needs a rendezvous address. With more, the process group is created over
    `rendezvous`, else over the one `joining` holds, else from `init_method` (default ``env://``);
    a finite timeout turns a collective with a dead rank into an exception instead of a hang.
    """

    def __init__(self, dist_backend: str, world_size: int, rank: int, init_method: str | None = None,
                 rendezvous: Rendezvous | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self.dist_backend = dist_backend
        self.world_size = world_size
        self.rank = rank
        self._owns_group = world_size > 1 and not dist.is_initialized()
        if self._owns_group:
            rendezvous = rendezvous or _JOINING.get()
            if rendezvous is not None:
                dist.init_process_group(dist_backend, store=rendezvous.store, timeout=rendezvous.timeout,
                                        world_size=world_size, rank=rank)
            else:
                dist.init_process_group(dist_backend, init_method=init_method or "env://",
                                        world_size=world_size, rank=rank)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    def close(self) -> None:
        # A gloo group left to the interpreter's exit can abort the process ("terminate called without
        # an active exception": its worker threads outlive the interpreter), so the rank's end destroys it.
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a tensor-parallel group: what model layers need to shard and reduce.

    Built once per engine from the backend's `tokenmill_communicator` and `tokenmill_tensor_parallel_plan`
    hooks; one rank (the default) means no sharding and collectives that are the identity.
    """

    rank: int = 0
    world_size: int = 1
    communicator: Communicator | None = None
    plan: TensorParallelPlan | None = None

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1


SINGLE_RANK = ParallelContext()
