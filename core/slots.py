"""Running a `SlotModel`: a model that keeps its own KV cache in fixed sequence slots.

The scheduler's rule is unchanged: it sees the slots as a block manager whose blocks are a whole
sequence long, so a running request holds exactly one block, its slot, and a request waits while every
slot is taken. The runner sends each step's tokens to the model addressed by slot, with no paged
metadata, and the model returns the logits to sample from.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tokenmill.block_manager import BlockManager
from tokenmill.interfaces import SlotBatch, SlotModel
from tokenmill.model_runner import SequenceStep
from tokenmill.request import Request

PREFIX_CACHING_UNAVAILABLE = "unavailable (the backend's model owns its cache)"


class SlotAllocator(BlockManager):
    """One block of `max_seq_len` tokens per request: block id = slot id. Prefix caching is off.

    A block manager rather than a second allocator, so the scheduler's admission, preemption and
    freeing work on slots untouched; the engine caps a request's length at `max_seq_len`, so a request
    never needs a second block. Freeing a request tells the model its slot's cache is dead.
    """

    def __init__(self, model: SlotModel):
        super().__init__(model.num_slots, model.max_seq_len, enable_prefix_caching=False)
        self._release = model.free

    def free_request(self, request: Request) -> None:
        for slot in request.block_ids:
            self._release(slot)
        super().free_request(request)


class SlotRunner:
    """Runs one step of a `SlotModel`; the engine calls it as it calls `ModelRunner`."""

    padding = None  # the model pads to its compiled shapes itself
    num_step_shapes = 0

    def __init__(self, model: SlotModel):
        self.model = model

    @torch.inference_mode()
    def execute(self, steps: Sequence[SequenceStep]) -> torch.Tensor:
        """Logits (num_logits, vocab) for the positions the steps asked for, in order."""
        query_lens = np.fromiter((len(s.token_ids) for s in steps), dtype=np.int64, count=len(steps))
        starts = np.fromiter((s.start_position for s in steps), dtype=np.int64, count=len(steps))
        num_tokens = int(query_lens.sum())
        cu_query = np.zeros(len(steps) + 1, dtype=np.int64)
        np.cumsum(query_lens, out=cu_query[1:])
        seq_of_token = np.repeat(np.arange(len(steps)), query_lens)
        positions = starts[seq_of_token] + (np.arange(num_tokens) - cu_query[:-1][seq_of_token])
        batch = SlotBatch(
            input_ids=torch.from_numpy(np.fromiter((t for s in steps for t in s.token_ids), dtype=np.int64,
                                                   count=num_tokens)),
            positions=torch.from_numpy(positions),
            slot_ids=torch.tensor([s.block_table[0] for s in steps], dtype=torch.int64),
            query_start_loc=torch.from_numpy(cu_query),
            num_logits=torch.tensor([s.num_logits for s in steps], dtype=torch.int64),
            is_decode=bool((query_lens == 1).all() and (starts > 0).all()),
        )
        return self.model.forward(batch)
