"""A GPU family's torch runtime as the GPU plugins use it: device set-up and the KV-cache memory budget.

`torch.cuda` serves NVIDIA and AMD (a ROCm build of torch answers to the same module), `torch.xpu`
Intel; both offer the same memory calls, so the three plugins share this code and differ only in
the module they hand it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.interfaces import DevicePlatform, MemoryRequest

logger = logging.getLogger(__name__)

# Kept free of the fraction the user allows: the allocator's fragmentation, the communicator's
# buffers and the graph pool's growth after the budget is taken.
HEADROOM_FRACTION = 0.02
GRAPH_RESERVE_BYTES = 512 << 20


@dataclass(frozen=True)
class GpuRuntime:
    """One GPU family's torch module (`torch.cuda`, `torch.xpu`) and the device type it names."""

    module: Any
    device_type: str
    family: str  # for descriptions: "NVIDIA", "AMD", "Intel"

    def init_device(self, device_index: int) -> DevicePlatform:
        """Bind this process to device `device_index` (one rank, one device) and describe it."""
        count = self.module.device_count()
        if not 0 <= device_index < count:
            raise RuntimeError(f"{self.family} GPU {device_index} is not visible to this process ({count} visible)")
        self.module.set_device(device_index)
        device = torch.device(self.device_type, device_index)
        bf16 = _bf16_supported(self.module)
        props = self.module.get_device_properties(device_index)
        return DevicePlatform(
            device=device,
            supported_dtypes=(torch.float32, torch.bfloat16, torch.float16) if bf16 else (torch.float32, torch.float16),
            preferred_dtype=torch.bfloat16 if bf16 else torch.float16,
            description=f"{props.name}, {props.total_memory / 2**30:.0f} GiB",
        )

    def memory_budget(self, device: torch.device, request: MemoryRequest, graphs: bool) -> int:
        """The KV cache's bytes: the allowed fraction of the device, less what is in use and the peak
        of one profiled forward at the largest step (its activations are not resident yet)."""
        if request.kv_cache_bytes is not None:
            return request.kv_cache_bytes
        m = self.module
        m.synchronize(device)
        m.empty_cache()
        m.reset_peak_memory_stats(device)
        baseline = m.memory_allocated(device)
        profile = getattr(request, "profile", None)
        if profile is not None:
            profile()
            m.synchronize(device)
        activations = m.max_memory_allocated(device) - baseline
        m.empty_cache()
        free, total = m.mem_get_info(device)
        in_use = total - free  # weights, the runtime's context, other processes on this device
        allowed = int(total * min(request.memory_fraction, 1.0 - HEADROOM_FRACTION))
        budget = allowed - in_use - activations - (GRAPH_RESERVE_BYTES if graphs else 0)
        logger.info("KV-cache budget %.2f GiB (device %.1f GiB, in use %.2f GiB, profiled activations %.2f GiB, "
                    "fraction %.2f)", budget / 2**30, total / 2**30, in_use / 2**30, activations / 2**30,
                    request.memory_fraction)
        if budget <= 0:
            raise RuntimeError(f"no memory is left for the KV cache on {device}: {in_use / 2**30:.1f} GiB in use and "
                               f"{activations / 2**30:.1f} GiB of activations of {allowed / 2**30:.1f} GiB allowed; "
                               "raise --cuda-memory-fraction or lower --max-batch-prefill-tokens")
        return budget


def _bf16_supported(module: Any) -> bool:
    check = getattr(module, "is_bf16_supported", None)
    return bool(check()) if check is not None else True
