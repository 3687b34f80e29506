"""Setting up the CPU for the model process: threads, dtype, and how much memory the KV cache gets."""

from __future__ import annotations

import ctypes
import logging

import torch

from tokenmill.interfaces import DevicePlatform, MemoryRequest
from tokenmill.plugins.cpu.discover import bf16_description, bf16_is_faster, memory_bytes, usable_cores

logger = logging.getLogger(__name__)

# Without an explicit size, the KV cache takes this share of the memory still available after the
# weights, capped like vLLM's CPU default (VLLM_CPU_KVCACHE_SPACE=4 GiB) so a laptop stays usable.
KV_CACHE_SHARE = 0.5
KV_CACHE_CAP_BYTES = 4 << 30


def init_device() -> DevicePlatform:
    threads = usable_cores()
    # One intra-op thread per usable core; inter-op parallelism only oversubscribes a decode step.
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already fixed once parallel work has run in this process
        logger.debug("inter-op threads already set")
    dtypes = (torch.bfloat16, torch.float32) if bf16_is_faster() else (torch.float32, torch.bfloat16)
    description = f"{threads} threads, {bf16_description()}"
    return DevicePlatform(
        device=torch.device("cpu"),
        supported_dtypes=(torch.float32, torch.bfloat16, torch.float16),
        preferred_dtype=dtypes[0],
        description=description,
    )


def memory_budget(request: MemoryRequest) -> int:
    # Asked once the weights are loaded and prepared: what the loading freed goes back to the OS first.
    release_freed_heap()
    if request.kv_cache_bytes is not None:
        return request.kv_cache_bytes
    total, available = memory_bytes()
    # `available` already excludes the loaded weights; without it, estimate from the total.
    free = available if available is not None else int(total * request.memory_fraction) - request.weights_bytes
    return max(0, min(int(free * KV_CACHE_SHARE), KV_CACHE_CAP_BYTES))


def release_freed_heap() -> None:
    """Hand the heap pages freed while loading back to the OS (glibc's `malloc_trim`; elsewhere nothing).

    The checkpoint's tensors and the dense weights packing replaced are freed, but glibc keeps freed chunks
    below its mmap threshold (which grows to 32 MiB as large blocks are freed) in the heap, resident: about
    0.2 GiB for SmolLM2-135M's GGUF. Trimming takes milliseconds, once.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        logger.debug("no malloc_trim: freed heap pages stay with the allocator")
