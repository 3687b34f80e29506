"""Google TPUs through torch-xla: libtpu and the TPU's device files (/dev/accel*, /dev/vfio on v5e+).

torch-xla also runs on XLA's CPU device when ``PJRT_DEVICE=CPU`` is set. That is how this backend is
tested where no TPU is, so discovery reports it as usable then, below the cpu backend's priority: it
is chosen only by ``--backend tpu``, never over the real CPU backend.
"""

from __future__ import annotations

import os

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery
from tokenmill.probe import device_files, module_available, versions_of

PRIORITY = 95
XLA_CPU_PRIORITY = 5  # under the cpu backend's 10: a test device, not a fast one
EXTRA = "tpu"


def tpu_device_files() -> list[str]:
    return device_files("/dev/accel*", "/dev/vfio/[0-9]*")


def discover() -> Discovery:
    versions = versions_of("torch-xla", "libtpu")
    files = tpu_device_files()
    if not module_available("torch_xla"):
        note = "" if files else "; no TPU device files either (/dev/accel*, /dev/vfio)"
        return Discovery(BackendStatus.LIBRARY_MISSING, f"torch-xla is not installed{note}", PRIORITY,
                         versions=versions, install_extra=EXTRA)
    if os.environ.get("PJRT_DEVICE", "").upper() == "CPU":  # XLA's CPU device allocates from the host
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        device = DeviceInfo(0, "XLA CPU device (PJRT_DEVICE=CPU)", total, free)
        return Discovery(BackendStatus.USABLE, "XLA's CPU device (PJRT_DEVICE=CPU): for testing this backend, "
                         "not for speed; chosen only with --backend tpu", XLA_CPU_PRIORITY, (device,), versions, EXTRA)
    if not module_available("libtpu"):
        return Discovery(BackendStatus.LIBRARY_MISSING, "torch-xla is installed without libtpu "
                         "(pip install 'torch-xla[tpu]'); set PJRT_DEVICE=CPU to run on XLA's CPU device", PRIORITY,
                         versions=versions, install_extra=EXTRA)
    if not files:
        return Discovery(BackendStatus.NO_DEVICE, "no TPU visible (/dev/accel*, /dev/vfio)", PRIORITY,
                         versions=versions, install_extra=EXTRA)
    memory = chip_memory_bytes(os.environ.get("TPU_ACCELERATOR_TYPE", ""))
    devices = tuple(DeviceInfo(i, f"TPU chip ({path})", memory) for i, path in enumerate(files))
    return Discovery(BackendStatus.USABLE, f"{len(devices)} TPU chip(s)", PRIORITY, devices, versions, EXTRA)


# HBM per chip by generation, from Google's published TPU specifications: discovery must not start the
# TPU runtime to ask it. Keyed by the prefix of TPU_ACCELERATOR_TYPE, which Cloud TPU VMs set
# ("v5litepod-8", "v4-8", ...). Unverified here: no TPU was at hand.
_HBM_GIB = {"v6e": 32, "v5litepod": 16, "v5e": 16, "v5p": 95, "v4": 32, "v3": 16, "v2": 8}


def chip_memory_bytes(accelerator_type: str) -> int:
    """One chip's HBM for an accelerator type such as "v5litepod-8", or 0 when the type is unknown."""
    generation = accelerator_type.split("-")[0].lower()
    return _HBM_GIB.get(generation, 0) << 30
