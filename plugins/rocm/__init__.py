"""The rocm backend for AMD GPUs: the shared Triton kernels (AMD targets), HIP graphs, RCCL.

A ROCm build of torch drives AMD GPUs through the `torch.cuda` module and names RCCL "nccl", so this
plugin is the Triton GPU backend with its own discovery. fp8 weights run through the Triton kernel
that dequantizes in registers: MI300's fp8 is the fnuz variant, which `torch._scaled_mm` with the
checkpoint's e4m3fn scales does not take as is.
"""

from __future__ import annotations

import torch

from tokenmill.plugins.rocm import discover as _discover
from tokenmill.plugins.triton.plugin import TritonGpuPlugin


def _runtime():
    from tokenmill.plugins.triton.runtime import GpuRuntime

    return GpuRuntime(torch.cuda, "cuda", "AMD")


plugin = TritonGpuPlugin(_discover.discover, _runtime, dist_backend="nccl", graphs=True, native_fp8=lambda: False)
