"""AMD GPUs: a ROCm (HIP) build of torch, devices listed through amdsmi without a HIP context."""

from __future__ import annotations

import torch

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery
from tokenmill.probe import device_files, module_available, versions_of

PRIORITY = 100
EXTRA = "rocm"


def _amdsmi_devices() -> tuple[DeviceInfo, ...] | None:
    if not module_available("amdsmi"):
        return None
    import amdsmi

    try:
        amdsmi.amdsmi_init()
    except Exception:  # noqa: BLE001 - amdsmi raises its own error types when no driver answers
        return None
    try:
        devices = []
        for index, handle in enumerate(amdsmi.amdsmi_get_processor_handles()):
            info = amdsmi.amdsmi_get_gpu_asic_info(handle)
            total = amdsmi.amdsmi_get_gpu_memory_total(handle, amdsmi.AmdSmiMemoryType.VRAM)
            devices.append(DeviceInfo(index, str(info.get("market_name", "AMD GPU")), int(total)))
        return tuple(devices)
    finally:
        amdsmi.amdsmi_shut_down()


def discover() -> Discovery:
    versions = {"torch": torch.__version__, "hip (torch build)": torch.version.hip or "none"}
    versions.update(versions_of("amdsmi"))
    has_driver = bool(device_files("/dev/kfd"))
    driver_note = "" if has_driver else "; no ROCm driver found either (/dev/kfd)"
    if not torch.version.hip:
        return Discovery(BackendStatus.LIBRARY_MISSING,
                         f"torch {torch.__version__} is not a ROCm build (install torch from the ROCm index)"
                         f"{driver_note}", PRIORITY, versions=versions, install_extra=EXTRA)
    devices = _amdsmi_devices()
    if devices is None:
        devices = tuple(DeviceInfo(i, "AMD GPU (install amdsmi for details)", 0)
                        for i in range(torch.cuda.device_count()))
    if not devices:
        return Discovery(BackendStatus.NO_DEVICE, f"no AMD GPU visible (check HIP_VISIBLE_DEVICES){driver_note}",
                         PRIORITY, versions=versions, install_extra=EXTRA)
    return Discovery(BackendStatus.USABLE, f"{len(devices)} AMD GPU(s)", PRIORITY, devices, versions, EXTRA)
