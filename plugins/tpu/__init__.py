"""The tpu backend: torch-xla on Google TPUs (and on XLA's CPU device, where it is tested).

Static shapes throughout: every step is padded to a (tokens, sequences) bucket, the forward and its
KV-cache writes run as one XLA graph per bucket, compiled at warm-up, and sampling runs on the host.
Hook implementations only; each delegates to the module that does the work. No torch-xla import
happens before a hook needs it, so discovery stays cheap.
"""

from __future__ import annotations

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
from tokenmill.plugins.tpu import buckets as _buckets
from tokenmill.plugins.tpu import discover as _discover
from tokenmill.plugins.tpu import runtime as _runtime


@hookimpl
def tokenmill_discover() -> Discovery:
    return _discover.discover()


@hookimpl
def tokenmill_init_device(device_index: int) -> DevicePlatform:
    return _runtime.init_device(device_index)


@hookimpl
def tokenmill_memory_budget(device: torch.device, request: MemoryRequest) -> int:
    return _runtime.memory_budget(device, request)


@hookimpl
def tokenmill_kv_cache_layout(shape: KVCacheShape, device: torch.device) -> KVCacheLayout:
    from tokenmill.plugins.tpu.attention import XLAKVCacheLayout

    return XLAKVCacheLayout(shape, device)


@hookimpl
def tokenmill_attention_backend(spec: AttentionSpec, layout: KVCacheLayout) -> AttentionBackend:
    from tokenmill.plugins.tpu.attention import XLAPagedAttention

    return XLAPagedAttention(spec, layout)


@hookimpl
def tokenmill_shape_buckets(max_num_tokens: int, max_num_seqs: int) -> ShapeBuckets:
    return _buckets.shape_buckets(max_num_tokens, max_num_seqs)


@hookimpl
def tokenmill_compile_model(model: torch.nn.Module) -> Any:
    return _runtime.SyncedStep(model)


@hookimpl
def tokenmill_communicator(world_size: int, rank: int, device: torch.device) -> Communicator:
    return _runtime.xla_communicator(world_size, rank, device)


@hookimpl
def tokenmill_ray_resources(num_devices: int) -> dict[str, float]:
    return {"TPU": float(num_devices)}


@hookimpl
def tokenmill_moe_method(dtype: torch.dtype) -> MoEMethod:
    # The reference slices tokens per expert by counts read on the host: a new graph per routing on XLA,
    # and a host read inside the traced step. Every expert over every token keeps one shape.
    return StaticShapeMoEMethod()
