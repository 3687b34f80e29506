"""The neuron backend for AWS Inferentia and Trainium: optimum-neuron's compiled model, slot by slot.

The model is compiled ahead of time for a fixed batch and sequence length and keeps its own KV cache
by sequence slot, so the plugin implements `tokenmill_model_executor` (a `SlotModel`) instead of the
paged-cache hooks; the core still schedules, batches continuously over the slots and samples.
Hook implementations only; each delegates to the module that does the work.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.hookspecs import hookimpl
from tokenmill.interfaces import DevicePlatform, Discovery, SlotModel
from tokenmill.plugins.neuron import discover as _discover
from tokenmill.plugins.neuron import executor as _executor
from tokenmill.plugins.neuron import platform as _platform


@hookimpl
def tokenmill_discover() -> Discovery:
    return _discover.discover()


@hookimpl
def tokenmill_init_device(device_index: int) -> DevicePlatform:
    return _platform.init_device()


@hookimpl
def tokenmill_model_executor(model_id: str, checkpoint: Any, dtype: torch.dtype, max_num_seqs: int,
                             max_model_len: int) -> SlotModel:
    _executor.check_model_source(model_id, checkpoint.format)
    model = _executor.load_compiled_model(model_id, dtype, max_num_seqs, max_model_len)
    return _executor.NeuronSlotModel(model)


@hookimpl
def tokenmill_ray_resources(num_devices: int) -> dict[str, float]:
    return {"neuron_cores": float(num_devices)}
