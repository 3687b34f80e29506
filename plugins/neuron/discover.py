"""AWS Inferentia / Trainium: Neuron device files and the Neuron SDK (torch-neuronx, optimum-neuron)."""

from __future__ import annotations

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery
from tokenmill.probe import device_files, module_available, versions_of

PRIORITY = 95
EXTRA = "neuron"


def discover() -> Discovery:
    versions = versions_of("torch-neuronx", "optimum-neuron", "neuronx-cc")
    files = device_files("/dev/neuron*")
    if not (module_available("torch_neuronx") and module_available("optimum.neuron")):
        note = "" if files else "; no Neuron device files either (/dev/neuron*)"
        return Discovery(BackendStatus.LIBRARY_MISSING,
                         f"the Neuron SDK (torch-neuronx from AWS's index, optimum-neuron) is not installed{note}",
                         PRIORITY, versions=versions, install_extra=EXTRA)
    if not files:
        return Discovery(BackendStatus.NO_DEVICE, "no Neuron device visible (/dev/neuron*)", PRIORITY,
                         versions=versions, install_extra=EXTRA)
    devices = tuple(DeviceInfo(i, f"Neuron device ({path})", 0) for i, path in enumerate(files))
    return Discovery(BackendStatus.USABLE, f"{len(devices)} Neuron device(s)", PRIORITY, devices, versions, EXTRA)
