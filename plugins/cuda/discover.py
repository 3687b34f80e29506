"""NVIDIA GPUs: found through NVML (nvidia-ml-py) so the launcher never creates a CUDA context."""

from __future__ import annotations

import contextlib

import torch

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery
from tokenmill.probe import device_files, module_available, versions_of

PRIORITY = 100
EXTRA = "cuda"


def _nvml_devices() -> tuple[tuple[DeviceInfo, ...] | None, str]:
    """Devices from NVML, or None and why NVML could not list them (not installed, no driver...)."""
    if not module_available("pynvml"):
        return None, f"nvidia-ml-py is not installed (pip install 'tokenmill[{EXTRA}]')"
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None, f"NVML did not answer ({type(exc).__name__}: {exc})"
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            devices.append(DeviceInfo(index, name, memory.total, memory.free, {"compute_capability": f"{major}.{minor}"}))
        return tuple(devices), ""
    except Exception as exc:  # noqa: BLE001 - a GPU NVML cannot describe (lost, MIG quirks) is reported, not fatal
        return None, f"NVML could not list the GPUs ({type(exc).__name__}: {exc})"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def discover() -> Discovery:
    versions = {"torch": torch.__version__, "cuda (torch build)": torch.version.cuda or "none"}
    versions.update(versions_of("nvidia-ml-py"))
    has_driver = bool(device_files("/proc/driver/nvidia/version", "/dev/nvidia0"))
    driver_note = "" if has_driver else "; no NVIDIA driver found either (/proc/driver/nvidia, /dev/nvidia*)"
    if torch.version.hip:
        return Discovery(BackendStatus.NO_DEVICE, "this torch is a ROCm (HIP) build: the rocm backend serves it",
                         PRIORITY, versions=versions)
    if not torch.version.cuda:
        return Discovery(BackendStatus.LIBRARY_MISSING,
                         f"torch {torch.__version__} was built without CUDA (install a CUDA build of torch)"
                         f"{driver_note}", PRIORITY, versions=versions, install_extra=EXTRA)
    devices, nvml_note = _nvml_devices()
    if devices is None:
        # torch.cuda.device_count asks the driver for a count without creating a context.
        count = torch.cuda.device_count()
        devices = tuple(DeviceInfo(i, "NVIDIA GPU (NVML unavailable: no name or memory)", 0) for i in range(count))
    note = f"; {nvml_note}" if nvml_note else ""
    if not devices:
        return Discovery(BackendStatus.NO_DEVICE, f"no NVIDIA GPU visible (check the driver and "
                         f"CUDA_VISIBLE_DEVICES){driver_note}{note}", PRIORITY, versions=versions, install_extra=EXTRA)
    return Discovery(BackendStatus.USABLE, f"{len(devices)} NVIDIA GPU(s){note}", PRIORITY, devices, versions, EXTRA)
