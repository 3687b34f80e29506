"""torch-xla in the model process: the device, its memory, its compile count, and the step's sync.

Every torch-xla import is inside a function: discovery and `tokenmill env` never import it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from tokenmill.errors import ValidationError
from tokenmill.interfaces import DevicePlatform, MemoryRequest

logger = logging.getLogger(__name__)


def init_device(device_index: int) -> DevicePlatform:
    import torch_xla
    import torch_xla.runtime as xr

    device = torch_xla.device(device_index)
    kind = xr.device_type()
    return DevicePlatform(
        device=device,
        supported_dtypes=(torch.bfloat16, torch.float32),
        preferred_dtype=torch.bfloat16,
        description=f"torch-xla {torch_xla.__version__} on {kind} ({device})",
        # The sampler's shapes follow the batch and its settings: on the host they compile nothing.
        sampling_device=torch.device("cpu"),
        compile_count=compile_count,
        inference_mode=False,  # torch-xla's functionalization cannot take inference tensors
    )


def compile_count() -> int:
    """XLA graph compilations in this process so far (torch-xla's CompileTime metric)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def sync() -> None:
    """Run every pending lazy operation (the step's forward and its KV-cache writes) as one graph."""
    import torch_xla

    torch_xla.sync()


def device_memory(device: torch.device) -> dict[str, Any] | None:
    """XLA's memory report for `device`, or None where the runtime cannot give one (XLA's CPU device)."""
    import torch_xla.core.xla_model as xm

    try:
        return xm.get_memory_info(device)
    except RuntimeError as exc:  # CPU: "Bad StatusOr access: UNIMPLEMENTED"
        logger.debug("xm.get_memory_info(%s): %s", device, exc)
        return None


def memory_budget(device: torch.device, request: MemoryRequest) -> int:
    if request.kv_cache_bytes is not None:
        return request.kv_cache_bytes
    info = device_memory(device)
    if info is not None:
        # The weights are loaded, so bytes_used counts them; activations are XLA's (the step is compiled).
        return max(0, int(info["bytes_limit"] * request.memory_fraction) - int(info["bytes_used"]))
    import torch_xla.runtime as xr

    if xr.device_type() == "CPU":  # XLA's CPU device allocates from the host: size the cache as the cpu backend does
        return max(0, min(int(host_available_bytes() * HOST_KV_SHARE), HOST_KV_CAP_BYTES))
    raise ValidationError(f"XLA cannot report the memory of {device}: give the KV cache's size with --kv-cache-bytes")


# On XLA's CPU device: the cpu backend's default share of the host's free memory, and its cap.
HOST_KV_SHARE = 0.5
HOST_KV_CAP_BYTES = 4 << 30


def host_available_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class SyncedStep:
    """The model's forward followed by one `torch_xla.sync()`: each padded step shape is one XLA graph.

    Without the sync, the KV-cache writes of one step would stay pending into the next, and every step's
    graph would differ from the last (a compile per step).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = self.model(*args, **kwargs)
        sync()
        return hidden


def xla_communicator(world_size: int, rank: int, device: torch.device):
    """torch.distributed over XLA's collectives (the ``xla`` process-group backend). Never run over two
    TPU hosts or chips: no TPU was at hand, and XLA's CPU device runs no multi-process collectives."""
    from tokenmill.parallel import TorchDistributedCommunicator

    if world_size > 1:
        import torch_xla.runtime as xr

        if xr.device_type() == "CPU":
            raise RuntimeError("XLA's CPU device runs no collectives across processes (measured: the rendezvous "
                               "hangs); tensor parallelism on the tpu backend needs TPU chips")
        import torch_xla.distributed.xla_backend  # noqa: F401 - registers the "xla" process-group backend
    return TorchDistributedCommunicator("xla", world_size, rank)
