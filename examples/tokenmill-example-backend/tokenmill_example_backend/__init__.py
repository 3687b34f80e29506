"""An out-of-tree tokenmill backend: CPU kernels, 32-token KV blocks, low priority.

Everything a vendor writes is here: hook implementations marked with `tokenmill.hookimpl`.
"""

from __future__ import annotations

import torch

from tokenmill import hookimpl
from tokenmill.interfaces import (
    AttentionBackend,
    AttentionSpec,
    BackendStatus,
    DeviceInfo,
    DevicePlatform,
    Discovery,
    KVCacheLayout,
    KVCacheShape,
    MemoryRequest,
)
from tokenmill.plugins.cpu.attention import CPUKVCacheLayout, CPUPagedAttention

BLOCK_SIZE = 32
KV_CACHE_BYTES = 256 << 20


@hookimpl
def tokenmill_discover() -> Discovery:
    # Priority 1: below the in-tree cpu backend (10), so it runs only when forced.
    return Discovery(
        status=BackendStatus.USABLE,
        reason="example plugin: always usable, runs tokenmill's CPU kernels with 32-token blocks",
        priority=1,
        devices=(DeviceInfo(0, "host CPU (example plugin)", 1 << 30),),
        versions={"torch": torch.__version__},
    )


@hookimpl
def tokenmill_init_device(device_index: int) -> DevicePlatform:
    return DevicePlatform(
        device=torch.device("cpu"),
        supported_dtypes=(torch.float32,),
        preferred_dtype=torch.float32,
        description="example plugin on the host CPU",
    )


@hookimpl
def tokenmill_memory_budget(request: MemoryRequest) -> int:
    return request.kv_cache_bytes if request.kv_cache_bytes is not None else KV_CACHE_BYTES


@hookimpl
def tokenmill_kv_cache_layout(shape: KVCacheShape, device: torch.device) -> KVCacheLayout:
    return CPUKVCacheLayout(shape, device, block_size=BLOCK_SIZE)


@hookimpl
def tokenmill_attention_backend(spec: AttentionSpec, layout: KVCacheLayout) -> AttentionBackend:
    return CPUPagedAttention(spec, layout)
