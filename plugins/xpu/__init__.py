"""The xpu backend for Intel GPUs: stock `torch.xpu`, the shared Triton kernels (Intel's Triton), xccl.

intel-extension-for-pytorch is not needed (it pins one torch minor and is being retired). Decode
steps run eagerly: graph capture is not offered by `torch.xpu` across the torch versions we support.
"""

from __future__ import annotations

import torch

from tokenmill.plugins.triton.plugin import TritonGpuPlugin
from tokenmill.plugins.xpu import discover as _discover


def _runtime():
    from tokenmill.plugins.triton.runtime import GpuRuntime

    return GpuRuntime(torch.xpu, "xpu", "Intel")


plugin = TritonGpuPlugin(_discover.discover, _runtime, dist_backend="xccl", graphs=False, native_fp8=lambda: False)
