"""From the scheduler's decision to logits: the flattened batch, its attention metadata, one forward.

The runner never sees a request or a queue: it gets, per sequence, the tokens to feed this step, where
they start, the sequence's block table and how many trailing positions need logits. Batch building is
vectorised with numpy over all tokens of the step; the only per-sequence Python is list concatenation.
Everything is built on the host and sent over in one asynchronous copy per tensor, so on an accelerator
the step queues its work without ever waiting for the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tokenmill.interfaces import AttentionBackend, AttentionMetadata


def host_to_device(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`data`, built on the host, on `device`: the host's tensor itself, or one non-blocking copy.

    The copy goes from pinned memory where the device is the machine's accelerator: a copy from pageable
    memory may wait for the device's queue to drain, which is the host sync a step must not have.
    """
    tensor = torch.from_numpy(data) if isinstance(data, np.ndarray) else data
    if device.type == "cpu":
        return tensor
    if _pinned_memory_serves(device.type):
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@functools.cache
def _pinned_memory_serves(device_type: str) -> bool:
    # Pinned memory belongs to the current accelerator; any other device (meta) gets a plain copy.
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return accelerator is not None and accelerator.type == device_type


@dataclass(frozen=True)
class SequenceStep:
    """One sequence's share of a step."""

    token_ids: Sequence[int]  # the tokens fed this step (a prefill chunk, or the last sampled token)
    start_position: int  # position of token_ids[0]; every earlier token is already in the cache
    block_table: Sequence[int]  # the sequence's blocks, covering start_position + len(token_ids) tokens
    num_logits: int  # trailing positions that need logits: 1 to sample, more for prompt logprobs, 0 mid-prefill


@dataclass
class StepInputs:
    """The flattened batch handed to the model."""

    input_ids: torch.Tensor  # (num_tokens,) int64
    positions: torch.Tensor  # (num_tokens,) int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # (num_logits,) rows of the hidden states to turn into logits


def build_step_inputs(steps: Sequence[SequenceStep], block_size: int, device: torch.device) -> StepInputs:
    """Flatten `steps` into model inputs; tokens of each sequence stay contiguous, in order."""
    query_lens = np.fromiter((len(s.token_ids) for s in steps), dtype=np.int64, count=len(steps))
    starts = np.fromiter((s.start_position for s in steps), dtype=np.int64, count=len(steps))
    num_tokens = int(query_lens.sum())
    token_ids = np.fromiter((t for s in steps for t in s.token_ids), dtype=np.int64, count=num_tokens)

    cu_query = np.zeros(len(steps) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=cu_query[1:])
    seq_of_token = np.repeat(np.arange(len(steps)), query_lens)
    positions = starts[seq_of_token] + (np.arange(num_tokens) - cu_query[:-1][seq_of_token])

    max_blocks = max(len(s.block_table) for s in steps)
    block_tables = np.zeros((len(steps), max_blocks), dtype=np.int64)
    for row, s in enumerate(steps):
        block_tables[row, : len(s.block_table)] = s.block_table
    slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size

    seq_lens = starts + query_lens
    num_logits = np.fromiter((s.num_logits for s in steps), dtype=np.int64, count=len(steps))
    logits_indices = np.concatenate(
        [np.arange(end - n, end) for end, n in zip(cu_query[1:], num_logits) if n]
    ) if num_logits.any() else np.zeros(0, dtype=np.int64)

    metadata = AttentionMetadata(
        query_start_loc=host_to_device(cu_query.astype(np.int32), device),
        seq_lens=host_to_device(seq_lens.astype(np.int32), device),
        block_tables=host_to_device(block_tables.astype(np.int32), device),
        slot_mapping=host_to_device(slot_mapping, device),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
    )
    return StepInputs(
        input_ids=host_to_device(token_ids, device),
        positions=host_to_device(positions, device),
        metadata=metadata,
        logits_indices=host_to_device(logits_indices, device),
    )


class ModelRunner:
    """Runs one step of a model over the paged KV cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        forward: Any,  # the model's forward, possibly compiled by the backend
        kv_caches: list[torch.Tensor],
        attention_backends: Sequence[AttentionBackend],
        block_size: int,
        device: torch.device,
    ):
        self.model = model
        self.forward = forward
        self.kv_caches = kv_caches
        self.attention_backends = list(attention_backends)
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, steps: Sequence[SequenceStep]) -> torch.Tensor:
        """Logits (num_logits, vocab) in float32 for the positions the steps asked for, in order."""
        inputs = build_step_inputs(steps, self.block_size, self.device)
        for backend in self.attention_backends:
            backend.prepare(inputs.metadata)
        hidden = self.forward(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        return self.model.compute_logits(hidden[inputs.logits_indices])
