"""AWS Inferentia / Trainium: Neuron device files and the Neuron SDK (torch-neuronx, neuronx-distributed,
optimum-neuron), checked without importing any of them."""

from __future__ import annotations

from tokenmill.interfaces import BackendStatus, DeviceInfo, Discovery
from tokenmill.plugins.neuron.executor import SDK_MODULES
from tokenmill.probe import device_files, module_available, versions_of

PRIORITY = 95
EXTRA = "neuron"


def discover() -> Discovery:
    versions = versions_of(*SDK_MODULES.values(), "neuronx-cc")
    files = device_files("/dev/neuron*")
    missing = [dist for module, dist in SDK_MODULES.items() if not module_available(module)]
    if missing:
        note = "" if files else "; no Neuron device files either (/dev/neuron*)"
        return Discovery(BackendStatus.LIBRARY_MISSING,
                         f"the Neuron SDK is not complete: {', '.join(missing)} not installed (torch-neuronx and "
                         f"neuronx-distributed come from AWS's package index){note}",
                         PRIORITY, versions=versions, install_extra=EXTRA)
    if not files:
        return Discovery(BackendStatus.NO_DEVICE, "no Neuron device visible (/dev/neuron*)", PRIORITY,
                         versions=versions, install_extra=EXTRA)
    devices = tuple(DeviceInfo(i, f"Neuron device ({path})", 0) for i, path in enumerate(files))
    return Discovery(BackendStatus.USABLE, f"{len(devices)} Neuron device(s)", PRIORITY, devices, versions, EXTRA)
