"""Setting up an HPU for the model process, and how much of its memory the KV cache gets."""

from __future__ import annotations

import logging
import os

import torch

from tokenmill.interfaces import DevicePlatform, MemoryRequest
from tokenmill.plugins.gaudi import vendor

logger = logging.getLogger(__name__)

# Share of the memory left after weights and the profiled step kept back for the HPU graphs warm-up
# captures, one per padded shape (vLLM-Gaudi's VLLM_GRAPH_RESERVED_MEM default).
GRAPH_RESERVE_FRACTION = 0.1


def init_device(device_index: int) -> DevicePlatform:
    """Bind this process to an HPU in lazy mode and describe it.

    Lazy mode (``PT_HPU_LAZY_MODE=1``) queues ops into a graph until ``htcore.mark_step()``; HPU graphs
    then replay a whole step. Both variables must be set before the runtime is first imported, so they
    are set here only if the user has not. The runtime gives each process one free card (pin it with
    ``HABANA_VISIBLE_MODULES``), which the process sees as ``hpu``.
    """
    os.environ.setdefault("PT_HPU_LAZY_MODE", "1")
    os.environ.setdefault("PT_HPU_ENABLE_LAZY_COLLECTIVES", "true")  # all-reduce inside HPU graphs (TP)
    vendor.module("habana_frameworks.torch.core")  # registers the hpu device with torch
    hpu = vendor.module("habana_frameworks.torch.hpu")
    if not hpu.is_available() or hpu.device_count() < 1:
        raise RuntimeError(f"no Gaudi device is available to this process (rank {device_index}); check "
                           "HABANA_VISIBLE_MODULES and that no other process holds the card")
    if os.environ["PT_HPU_LAZY_MODE"] != "1":
        logger.warning("PT_HPU_LAZY_MODE=%s: the gaudi backend is written for lazy mode (1)",
                       os.environ["PT_HPU_LAZY_MODE"])
    return DevicePlatform(
        device=torch.device("hpu"),
        supported_dtypes=(torch.bfloat16, torch.float32),
        preferred_dtype=torch.bfloat16,
        description=f"{hpu.get_device_name()}, lazy mode, HPU graphs per shape bucket",
        # The sampler's shapes follow each batch's settings: on the HPU every new mix would compile.
        sampling_device=torch.device("cpu"),
    )


def memory_budget(request: MemoryRequest) -> int:
    """The KV cache's bytes: the allowed fraction of the card's memory, less the peak in use through one
    profiled largest step (weights and activations), less a reserve for the HPU graphs."""
    if request.kv_cache_bytes is not None:
        return request.kv_cache_bytes
    htcore = vendor.module("habana_frameworks.torch.core")
    hpu = vendor.module("habana_frameworks.torch.hpu")
    hpu.reset_peak_memory_stats()
    if request.profile is not None:
        request.profile()
        htcore.mark_step()  # lazy mode: the step's ops run (and allocate) only now
        hpu.synchronize()
    stats = hpu.memory_stats()
    limit, peak = stats["Limit"], stats["MaxInUse"]
    free = int(limit * request.memory_fraction) - peak
    budget = int(free * (1 - GRAPH_RESERVE_FRACTION))
    logger.info("KV-cache budget %.2f GiB (card %.1f GiB, peak in use %.2f GiB, fraction %.2f, graph reserve %.0f%%)",
                budget / 2**30, limit / 2**30, peak / 2**30, request.memory_fraction, 100 * GRAPH_RESERVE_FRACTION)
    if budget <= 0:
        raise RuntimeError(f"no HPU memory is left for the KV cache: {peak / 2**30:.1f} GiB at peak of "
                           f"{limit * request.memory_fraction / 2**30:.1f} GiB allowed; raise --cuda-memory-fraction "
                           "or lower --max-batch-prefill-tokens")
    return budget
