"""The gaudi backend for Intel Gaudi (HPU), on habana_frameworks directly: code, unverified on hardware.

Lazy mode, static shapes (token, sequence and block-table-width buckets), a torch-native paged attention,
one HPU graph per padded shape, HCCL for tensor parallelism. Hook implementations only; each delegates
to the module that does the work. habana_frameworks is imported inside the hooks that need the device
(`vendor.py`), never at import, so discovery stays cheap and the torch-native parts run anywhere.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tokenmill.hookspecs import hookimpl
from tokenmill.interfaces import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    DevicePlatform,
    Discovery,
    KVCacheLayout,
    KVCacheShape,
    MemoryRequest,
    MoEMethod,
    ShapeBuckets,
    StaticShapeMoEMethod,
)
from tokenmill.plugins.gaudi import buckets as _buckets
from tokenmill.plugins.gaudi import discover as _discover
from tokenmill.plugins.gaudi import graphs as _graphs
from tokenmill.plugins.gaudi import parallel as _parallel
from tokenmill.plugins.gaudi import platform as _platform
from tokenmill.plugins.gaudi.attention import GaudiKVCacheLayout, GaudiPagedAttention


@hookimpl
def tokenmill_discover() -> Discovery:
    return _discover.discover()


@hookimpl
def tokenmill_init_device(device_index: int) -> DevicePlatform:
    return _platform.init_device(device_index)


@hookimpl
def tokenmill_interpreter_platform() -> DevicePlatform:
    # No interpreter is needed: the attention and KV layout are torch ops, which run on host tensors as
    # they are. This checks their numerics and padding contract, not their lowering to the HPU.
    return DevicePlatform(torch.device("cpu"), (torch.float32, torch.bfloat16), torch.bfloat16,
                          "the gaudi backend's torch-native attention on the CPU (no HPU)")


@hookimpl
def tokenmill_memory_budget(request: MemoryRequest) -> int:
    return _platform.memory_budget(request)


@hookimpl
def tokenmill_kv_cache_layout(shape: KVCacheShape, device: torch.device) -> KVCacheLayout:
    return GaudiKVCacheLayout(shape, device)


@hookimpl
def tokenmill_attention_backend(spec: AttentionSpec, layout: KVCacheLayout) -> AttentionBackend:
    return GaudiPagedAttention(spec, layout)


@hookimpl
def tokenmill_communicator(world_size: int, rank: int) -> Communicator:
    return _parallel.communicator(world_size, rank)


@hookimpl
def tokenmill_shape_buckets(max_num_tokens: int, max_num_seqs: int) -> ShapeBuckets:
    return _buckets.shape_buckets(max_num_tokens, max_num_seqs, os.environ)


@hookimpl
def tokenmill_compile_model(model: torch.nn.Module, capture_sizes: tuple[int, ...] | None) -> Any:
    return _graphs.compile_model(model, capture_sizes)


@hookimpl
def tokenmill_ray_resources(num_devices: int) -> dict[str, float]:
    return {"HPU": float(num_devices)}


@hookimpl
def tokenmill_moe_method(dtype: torch.dtype) -> MoEMethod:
    # One HPU graph per padded shape: the reference's per-expert slices would change shape with each routing.
    return StaticShapeMoEMethod()
