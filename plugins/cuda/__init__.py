"""The cuda backend for NVIDIA GPUs: the shared Triton kernels, CUDA graphs for decode steps, NCCL.

Registered as the instance `plugin` (see `tokenmill.plugins.triton.plugin`): discovery is this
plugin's own, everything else is the Triton GPU backend driven through `torch.cuda`.
"""

from __future__ import annotations

import torch

from tokenmill.plugins.cuda import discover as _discover
from tokenmill.plugins.triton.plugin import TritonGpuPlugin

# fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
FP8_COMPUTE_CAPABILITY = (8, 9)


def _runtime():
    from tokenmill.plugins.triton.runtime import GpuRuntime

    return GpuRuntime(torch.cuda, "cuda", "NVIDIA")


def _native_fp8() -> bool:
    return torch.cuda.get_device_capability() >= FP8_COMPUTE_CAPABILITY


plugin = TritonGpuPlugin(_discover.discover, _runtime, dist_backend="nccl", graphs=True, native_fp8=_native_fp8)
