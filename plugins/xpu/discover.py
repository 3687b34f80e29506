"""Intel GPUs: torch's native XPU build (torch >= 2.5), with intel-extension-for-pytorch optional."""

from __future__ import annotations

import torch

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery
from tokenmill.probe import module_available, versions_of

PRIORITY = 90
EXTRA = "xpu"


def _xpu_compiled() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and getattr(xpu, "_is_compiled", lambda: False)())


def discover() -> Discovery:
    versions = {"torch": torch.__version__}
    versions.update(versions_of("intel-extension-for-pytorch"))
    if not _xpu_compiled() and not module_available("intel_extension_for_pytorch"):
        return Discovery(BackendStatus.LIBRARY_MISSING,
                         f"torch {torch.__version__} has no XPU support (install torch from the XPU index, "
                         "https://download.pytorch.org/whl/xpu) and intel-extension-for-pytorch is not installed",
                         PRIORITY, versions=versions, install_extra=EXTRA)
    try:
        # Level Zero answers these without creating a device context.
        available = torch.xpu.is_available()
        devices = tuple(DeviceInfo(i, (props := torch.xpu.get_device_properties(i)).name, props.total_memory)
                        for i in range(torch.xpu.device_count())) if available else ()
    except Exception as exc:  # noqa: BLE001 - a driver that fails to answer is a "no", with its message
        return Discovery(BackendStatus.NO_DEVICE, f"the XPU runtime failed to list devices ({type(exc).__name__}: "
                         f"{exc}); check the Level Zero driver", PRIORITY, versions=versions, install_extra=EXTRA)
    if not devices:
        return Discovery(BackendStatus.NO_DEVICE, "no Intel GPU visible (torch.xpu.is_available() is False; "
                         "check the Level Zero driver and ZE_AFFINITY_MASK)", PRIORITY, versions=versions,
                         install_extra=EXTRA)
    return Discovery(BackendStatus.USABLE, f"{len(devices)} Intel GPU(s)", PRIORITY, devices, versions, EXTRA)
