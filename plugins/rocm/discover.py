"""AMD GPUs: a ROCm (HIP) build of torch, devices listed through amdsmi without a HIP context."""

from __future__ import annotations

import contextlib
import io

import torch

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery
from tokenmill.probe import device_files, module_available, versions_of

PRIORITY = 100
EXTRA = "rocm"


def _import_amdsmi():
    """The amdsmi module, or the reason it cannot be used.

    The pip package finds its C library (libamd_smi.so, from ROCm's amd-smi-lib) at import time; where
    that library is missing the import prints two lines to stdout, which would corrupt `tokenmill env
    --json`, and then raises KeyError. Both are contained here.
    """
    if not module_available("amdsmi"):
        return None, f"amdsmi is not installed (pip install 'tokenmill[{EXTRA}]')"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            import amdsmi
    except Exception as exc:  # noqa: BLE001 - the package raises KeyError, OSError... when its library is absent
        said = " ".join(printed.getvalue().split())
        detail = said or f"{type(exc).__name__}: {exc}"
        return None, (f"the amdsmi package cannot load its library libamd_smi.so (install ROCm's amd-smi-lib, "
                      f"or set ROCM_PATH): {detail}")
    return amdsmi, ""


def _amdsmi_devices() -> tuple[tuple[DeviceInfo, ...] | None, str]:
    """Devices from amdsmi, or None and why amdsmi could not list them."""
    amdsmi, reason = _import_amdsmi()
    if amdsmi is None:
        return None, reason
    try:
        amdsmi.amdsmi_init()
    except Exception as exc:  # noqa: BLE001 - amdsmi raises its own error types when no driver answers
        return None, f"amdsmi found no driver ({exc})"
    try:
        devices = []
        for index, handle in enumerate(amdsmi.amdsmi_get_processor_handles()):
            info = amdsmi.amdsmi_get_gpu_asic_info(handle)
            total = amdsmi.amdsmi_get_gpu_memory_total(handle, amdsmi.AmdSmiMemoryType.VRAM)
            devices.append(DeviceInfo(index, str(info.get("market_name", "AMD GPU")), int(total)))
        return tuple(devices), ""
    except Exception as exc:  # noqa: BLE001 - a device amdsmi cannot describe is reported, not fatal
        return None, f"amdsmi could not list the GPUs ({exc})"
    finally:
        with contextlib.suppress(Exception):
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
    devices, amdsmi_note = _amdsmi_devices()
    if devices is None:
        # HIP's device count needs no context; it only lacks the names and memory amdsmi would give.
        devices = tuple(DeviceInfo(i, "AMD GPU (amdsmi unavailable: no name or memory)", 0)
                        for i in range(torch.cuda.device_count()))
    note = f"; {amdsmi_note}" if amdsmi_note else ""
    if not devices:
        return Discovery(BackendStatus.NO_DEVICE, f"no AMD GPU visible (check HIP_VISIBLE_DEVICES){driver_note}"
                         f"{note}", PRIORITY, versions=versions, install_extra=EXTRA)
    return Discovery(BackendStatus.USABLE, f"{len(devices)} AMD GPU(s){note}", PRIORITY, devices, versions, EXTRA)
