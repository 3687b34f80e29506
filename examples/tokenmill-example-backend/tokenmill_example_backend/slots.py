"""A second example backend, `example-slots`: a model that owns its KV cache in fixed sequence slots.

It stands in, on the CPU, for a backend like Neuron whose compiled model keeps each sequence's cache
in a slot (`seq_ids`) of a static batch: it implements `tokenmill_model_executor` instead of the
paged-cache hooks. Its model is tokenmill's own for the config, over a cache it allocates and
addresses itself: slot `s` owns a fixed run of blocks, enough for `max_seq_len` tokens. Like a
compiled model, it has a fixed number of slots and runs prefill and decode steps apart.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tokenmill import hookimpl
from tokenmill.interfaces import (
    BackendStatus,
    DeviceInfo,
    DevicePlatform,
    Discovery,
    SlotBatch,
    SlotModel,
)
from tokenmill.loader import build_dummy_model
from tokenmill.model_runner import ModelRunner, SequenceStep
from tokenmill.models import get_model_class, kv_cache_shape
from tokenmill.parallel import SINGLE_RANK
from tokenmill.plugins.cpu.attention import CPUKVCacheLayout, CPUPagedAttention

NUM_SLOTS = 4  # the "compiled" batch size: more requests than this wait for a slot
BLOCK_SIZE = 16


class SlotCachedModel(SlotModel):
    """tokenmill's model for `config`, each slot's keys and values in blocks only that slot uses."""

    def __init__(self, checkpoint: Any, dtype: torch.dtype, device: torch.device, num_slots: int,
                 max_seq_len: int, mixes_prefill_and_decode: bool = False, chunked_prefill: bool = True):
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.mixes_prefill_and_decode, self.chunked_prefill = mixes_prefill_and_decode, chunked_prefill
        layout = CPUKVCacheLayout(kv_cache_shape(checkpoint.config, dtype, SINGLE_RANK), device, block_size=BLOCK_SIZE)
        attention = {}

        def make_attention(spec):
            return attention.setdefault(spec, CPUPagedAttention(spec, layout))

        model_class = functools.partial(get_model_class(checkpoint.config), parallel=SINGLE_RANK)
        if checkpoint.format == "dummy":  # --load-format dummy: random weights of the model's shape
            model = build_dummy_model(model_class, checkpoint.config, make_attention, dtype, device, seed=0)
        else:
            model = model_class(checkpoint.config, make_attention, dtype)
            model.load_weights({k: v.to(device) for k, v in checkpoint.tensors.items()})
        model.to(device).eval()
        self.blocks_per_slot = -(-max_seq_len // BLOCK_SIZE)
        self.runner = ModelRunner(model, model, layout.allocate(num_slots * self.blocks_per_slot),
                                  list(attention.values()), BLOCK_SIZE, device)
        # Tokens cached per slot: a compiled model trusts the caller; this one checks the core's calls.
        self.lengths = [0] * num_slots

    def forward(self, batch: SlotBatch) -> torch.Tensor:
        bounds = batch.query_start_loc.tolist()
        steps = []
        for i, (slot, n_logits) in enumerate(zip(batch.slot_ids.tolist(), batch.num_logits.tolist())):
            start, end = bounds[i], bounds[i + 1]
            position = int(batch.positions[start])
            if position != self.lengths[slot]:
                raise RuntimeError(f"slot {slot} holds {self.lengths[slot]} tokens, but the step feeds it from "
                                   f"position {position}: a slot must be freed before another request uses it")
            self.lengths[slot] = position + end - start
            first = slot * self.blocks_per_slot
            steps.append(SequenceStep(batch.input_ids[start:end].tolist(), position,
                                      range(first, first + -(-self.lengths[slot] // BLOCK_SIZE)), n_logits))
        return self.runner.execute(steps)

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0


@hookimpl
def tokenmill_discover() -> Discovery:
    # Priority 0: below cpu and the other example, so it runs only when forced.
    return Discovery(
        status=BackendStatus.USABLE,
        reason="example plugin: always usable, runs a model that owns its KV cache in 4 sequence slots",
        priority=0,
        devices=(DeviceInfo(0, "host CPU (example slot plugin)", 1 << 30),),
        versions={"torch": torch.__version__},
    )


@hookimpl
def tokenmill_init_device(device_index: int) -> DevicePlatform:
    return DevicePlatform(
        device=torch.device("cpu"),
        supported_dtypes=(torch.float32,),
        preferred_dtype=torch.float32,
        description="example slot plugin on the host CPU",
    )


@hookimpl
def tokenmill_model_executor(checkpoint: Any, dtype: torch.dtype, device: torch.device, max_num_seqs: int,
                             max_model_len: int) -> SlotModel:
    return SlotCachedModel(checkpoint, dtype, device, min(NUM_SLOTS, max_num_seqs), max_model_len)
