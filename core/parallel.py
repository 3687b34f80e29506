"""A `Communicator` over torch.distributed, for any backend whose collectives torch knows by name."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tokenmill.interfaces import Communicator


class TorchDistributedCommunicator(Communicator):
    """Collectives through a torch.distributed backend ("gloo", "nccl", "xccl", ...).

    With one rank every collective is the identity and no process group is created, so a single
    process never needs a rendezvous address.
    """

    def __init__(self, dist_backend: str, world_size: int, rank: int, init_method: str | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self.dist_backend = dist_backend
        self.world_size = world_size
        self.rank = rank
        if world_size > 1 and not dist.is_initialized():
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
