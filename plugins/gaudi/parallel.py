"""Tensor parallelism over Gaudi cards: torch.distributed with Habana's collective library, HCCL."""

from __future__ import annotations

from tokenmill.interfaces import Communicator
from tokenmill.parallel import TorchDistributedCommunicator
from tokenmill.plugins.gaudi import vendor


def communicator(world_size: int, rank: int) -> Communicator:
    if world_size > 1:  # one rank creates no process group, so it needs no collective library
        vendor.module("habana_frameworks.torch.distributed.hccl")  # registers the "hccl" torch.distributed backend
    return TorchDistributedCommunicator("hccl", world_size, rank)
