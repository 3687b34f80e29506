"""Google TPUs: torch-xla with libtpu, and the TPU's device files (/dev/accel*, /dev/vfio on v5e+)."""

from __future__ import annotations

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery
from tokenmill.probe import device_files, module_available, versions_of

PRIORITY = 95
EXTRA = "tpu"


def discover() -> Discovery:
    versions = versions_of("torch-xla", "libtpu")
    files = device_files("/dev/accel*", "/dev/vfio/[0-9]*")
    if not (module_available("torch_xla") and module_available("libtpu")):
        note = "" if files else "; no TPU device files either (/dev/accel*, /dev/vfio)"
        return Discovery(BackendStatus.LIBRARY_MISSING, f"torch-xla with libtpu is not installed{note}",
                         PRIORITY, versions=versions, install_extra=EXTRA)
    if not files:
        return Discovery(BackendStatus.NO_DEVICE, "no TPU visible (/dev/accel*, /dev/vfio)", PRIORITY,
                         versions=versions, install_extra=EXTRA)
    devices = tuple(DeviceInfo(i, f"TPU chip ({path})", 0) for i, path in enumerate(files))
    return Discovery(BackendStatus.USABLE, f"{len(devices)} TPU chip(s)", PRIORITY, devices, versions, EXTRA)
