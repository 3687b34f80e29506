"""Torch-native answers for the optional hooks, registered `trylast` so any backend can override them.

A backend implements only what differs on its hardware; a hook it leaves out falls back to these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.hookspecs import hookimpl
from tokenmill.interfaces import (
    Communicator,
    GreedyPick,
    LayerOps,
    LoRAMethod,
    MemoryRequest,
    MoEMethod,
    QuantMethod,
    ShapeBuckets,
    ShardStyle,
    TensorParallelPlan,
    TokenMask,
)
from tokenmill.parallel import TorchDistributedCommunicator


class EvenSplitPlan(TensorParallelPlan):
    """Split a weight into `world_size` equal parts along the dimension its style names."""

    def shard(self, weight: torch.Tensor, style: ShardStyle, rank: int, world_size: int) -> torch.Tensor:
        if style is ShardStyle.REPLICATE or world_size == 1:
            return weight
        dim = 0 if style is ShardStyle.COLUMN else weight.dim() - 1
        if weight.shape[dim] % world_size:
            raise ValueError(
                f"cannot split dimension {dim} of size {weight.shape[dim]} evenly over {world_size} ranks; "
                "choose a tensor-parallel size that divides the model's heads and hidden sizes"
            )
        return weight.chunk(world_size, dim=dim)[rank].contiguous()


@hookimpl(trylast=True)
def tokenmill_memory_budget(device: torch.device, request: MemoryRequest) -> int:
    if request.kv_cache_bytes is not None:
        return request.kv_cache_bytes
    raise NotImplementedError(
        f"the backend for {device} does not implement tokenmill_memory_budget; pass an explicit KV-cache size"
    )


@hookimpl(trylast=True)
def tokenmill_communicator(world_size: int, rank: int, device: torch.device) -> Communicator:
    return TorchDistributedCommunicator("gloo", world_size, rank)


@hookimpl(trylast=True)
def tokenmill_tensor_parallel_plan(world_size: int) -> TensorParallelPlan:
    return EvenSplitPlan()


@hookimpl(trylast=True)
def tokenmill_ray_resources(num_devices: int) -> dict[str, float]:
    return {"CPU": float(num_devices)}


@hookimpl(trylast=True)
def tokenmill_quantization_methods() -> list[QuantMethod]:
    return []


@hookimpl(trylast=True)
def tokenmill_dense_linear_method(dtype: torch.dtype) -> QuantMethod | None:
    return None


@hookimpl(trylast=True)
def tokenmill_layer_ops(dtype: torch.dtype) -> LayerOps | None:
    return None


@hookimpl(trylast=True)
def tokenmill_lora_method(dtype: torch.dtype) -> LoRAMethod | None:
    return None


@hookimpl(trylast=True)
def tokenmill_moe_method(dtype: torch.dtype) -> MoEMethod | None:
    return None


@hookimpl(trylast=True)
def tokenmill_shape_buckets(max_num_tokens: int, max_num_seqs: int) -> ShapeBuckets | None:
    return None


@hookimpl(trylast=True)
def tokenmill_compile_model(model: nn.Module, buckets: ShapeBuckets | None) -> Any:
    return model


@hookimpl(trylast=True)
def tokenmill_model_executor(model_id: str, config: Any) -> nn.Module | None:
    return None


@hookimpl(trylast=True)
def tokenmill_token_mask() -> TokenMask:
    return TokenMask()


@hookimpl(trylast=True)
def tokenmill_greedy_pick() -> GreedyPick:
    return GreedyPick()
