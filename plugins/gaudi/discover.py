"""Intel Gaudi (HPU): the SynapseAI stack (habana_frameworks) and its devices, via HLML when present."""

from __future__ import annotations

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery
from tokenmill.probe import device_files, module_available, versions_of

PRIORITY = 95
EXTRA = "gaudi"


def _hlml_devices() -> tuple[DeviceInfo, ...] | None:
    if not module_available("pyhlml"):
        return None
    import pyhlml

    try:
        pyhlml.hlmlInit()
    except Exception:  # noqa: BLE001 - HLML raises its own errors when no driver answers
        return None
    try:
        devices = []
        for index in range(pyhlml.hlmlDeviceGetCount()):
            handle = pyhlml.hlmlDeviceGetHandleByIndex(index)
            memory = pyhlml.hlmlDeviceGetMemoryInfo(handle)
            devices.append(DeviceInfo(index, str(pyhlml.hlmlDeviceGetName(handle)), memory.total, memory.free))
        return tuple(devices)
    finally:
        pyhlml.hlmlShutdown()


def discover() -> Discovery:
    versions = versions_of("habana-torch-plugin", "habana-pyhlml")
    files = device_files("/dev/accel/accel*", "/dev/hl*")
    if not module_available("habana_frameworks"):
        note = "" if files else "; no Gaudi device files either (/dev/accel/accel*)"
        return Discovery(BackendStatus.LIBRARY_MISSING, "habana_frameworks (SynapseAI, from Intel's Gaudi software, "
                         f"not PyPI) is not installed{note}", PRIORITY, versions=versions, install_extra=EXTRA)
    devices = _hlml_devices()
    if devices is None:
        devices = tuple(DeviceInfo(i, f"Gaudi ({path})", 0) for i, path in enumerate(files))
    if not devices:
        return Discovery(BackendStatus.NO_DEVICE, "no Gaudi device visible (/dev/accel/accel*, HABANA_VISIBLE_DEVICES)",
                         PRIORITY, versions=versions, install_extra=EXTRA)
    return Discovery(BackendStatus.USABLE, f"{len(devices)} Gaudi device(s)", PRIORITY, devices, versions, EXTRA)
