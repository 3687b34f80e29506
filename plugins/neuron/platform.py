"""The process side of the neuron backend: what the engine samples on, and in which dtypes.

The compiled model runs on the NeuronCores through torch-neuronx (XLA), but it takes host tensors and
returns its logits as host tensors: tokenmill's sampler, detokenizer and scheduler work on the CPU.
Which cores the model uses is the Neuron runtime's choice (``NEURON_RT_VISIBLE_CORES``), not a torch
device index, so `device_index` selects nothing here.
"""

from __future__ import annotations

import torch

from tokenmill.interfaces import DevicePlatform
from tokenmill.probe import device_files


def init_device() -> DevicePlatform:
    devices = len(device_files("/dev/neuron*"))
    return DevicePlatform(
        device=torch.device("cpu"),
        # The dtype a model is compiled in (`--dtype`); bf16 is what NeuronCores compute natively.
        supported_dtypes=(torch.bfloat16, torch.float16, torch.float32),
        preferred_dtype=torch.bfloat16,
        description=f"AWS Neuron ({devices} device(s)): the compiled model runs on the NeuronCores, "
                    "its logits are sampled on the host CPU",
    )
