"""From the scheduler's decision to logits: the flattened batch, its attention metadata, one forward.

The runner never sees a request or a queue: it gets, per sequence, the tokens to feed this step, where
they start, the sequence's block table and how many trailing positions need logits. Batch building is
vectorised with numpy over all tokens of the step; the only per-sequence Python is list concatenation.
Everything is built on the host and sent over in one asynchronous copy per tensor, so on an accelerator
the step queues its work without ever waiting for the device.

A backend that compiles per shape (`ShapeBuckets`) gets every step padded to a bucket (`StepPadding`), so
it only ever sees the few shapes warm-up compiled; without buckets nothing is padded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from tokenmill import batch_rows
from tokenmill.interfaces import AttentionBackend, AttentionMetadata, LoRABatch, ShapeBuckets
from tokenmill.lora.batch import group_by_slot

if TYPE_CHECKING:
    from tokenmill.lora.adapters import LoRAAdapters


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
class StepEmbeddings:
    """Rows that replace the token embeddings at some of a sequence's fed tokens (an image's, `tokenmill.multimodal`)."""

    offsets: Sequence[int]  # indices into the step's token_ids, ascending
    rows: torch.Tensor  # (len(offsets), hidden)


@dataclass(frozen=True)
class SequenceStep:
    """One sequence's share of a step."""

    token_ids: Sequence[int]  # the tokens fed this step (a prefill chunk, or the last sampled token)
    start_position: int  # position of token_ids[0]; every earlier token is already in the cache
    block_table: Sequence[int]  # the sequence's blocks, covering start_position + len(token_ids) tokens
    num_logits: int  # trailing positions that need logits: 1 to sample, more for prompt logprobs, 0 mid-prefill
    adapter: int = 0  # the LoRA adapter's slot (`tokenmill.lora`); 0: the base model
    embeddings: StepEmbeddings | None = None  # image rows for some of token_ids; None: token embeddings only
    rope_prefill_length: int = 0  # `Request.rope_prefill_length`, for length-dependent RoPE (`rope_lengths`)


@dataclass
class StepInputs:
    """The flattened batch handed to the model."""

    input_ids: torch.Tensor  # (num_tokens,) int64
    positions: torch.Tensor  # (num_tokens,) int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # (num_logits,) rows of the hidden states to turn into logits
    # With padding: how many leading rows of logits_indices are real (the rest are dropped); None: all.
    num_logits: int | None = None
    lora: LoRABatch | None = None  # which adapter each token uses; None: every token uses the base model


@dataclass(frozen=True)
class StepShape:
    """The static shape of a padded step; each distinct one is a compilation for the backend."""

    num_tokens: int  # token bucket
    num_seqs: int  # sequence bucket
    blocks_per_seq: int  # block-table width bucket (the model's longest context without width buckets)
    num_logits: int  # logit rows: the sequence bucket, or the token bucket when prompt logprobs need more
    is_decode: bool  # every real sequence feeds one token: max_query_len is 1


@dataclass(frozen=True)
class StepPadding:
    """How every step of a backend with `ShapeBuckets` is padded to a static shape.

    * Tokens: up to the token bucket. Padding tokens come after every real one and belong to no
      sequence: token id 0, position 0, slot -1 (nothing is written to the cache).
    * Sequences: up to the sequence bucket. Padding sequences come after the real ones: query length 0
      (`query_start_loc` repeats its last value), seq_len 0, a block table of zeros.
    * Block tables: up to the smallest of `widths` that holds the step's widest table, padded with
      block 0. `widths` are the buckets' `blocks_per_seq` clamped to `max_blocks_per_seq`, whose last
      must reach it (any context the model allows then fits); without them, the one width
      `max_blocks_per_seq` (the model's longest context).
    * Host ints: `max_query_len` is 1 for a decode step (every real sequence feeds one token), else the
      token bucket (no sequence can feed more); `max_seq_len` is the width in tokens, capped at
      `max_seq_len` (the model's context length). Both are then fixed by the shape, never by the step's data.
    * Logits: `logits_indices` is padded (with row 0) to the sequence bucket, or to the token bucket
      when prompt logprobs ask for more rows than that; the padded rows are dropped after the forward.
    """

    buckets: ShapeBuckets
    max_blocks_per_seq: int  # ceil(max_model_len / block_size)
    max_seq_len: int  # max_model_len
    block_size: int | None = None  # tokens per block; required with width buckets
    widths: tuple[int, ...] = field(init=False)  # the block-table widths steps are padded to

    def __post_init__(self) -> None:
        widths = self.buckets.blocks_per_seq
        if widths is None:
            widths = (self.max_blocks_per_seq,)
        elif self.block_size is None:
            raise ValueError("StepPadding needs the block size to pad block tables to ShapeBuckets.blocks_per_seq")
        elif widths[-1] < self.max_blocks_per_seq:
            raise ValueError(f"the largest ShapeBuckets.blocks_per_seq bucket ({widths[-1]} blocks) must hold the "
                             f"model's context: {self.max_seq_len} tokens take {self.max_blocks_per_seq} blocks of "
                             f"{self.block_size}")
        else:
            widths = tuple(sorted({min(width, self.max_blocks_per_seq) for width in widths}))
        object.__setattr__(self, "widths", widths)

    def shape_of(self, num_tokens: int, num_seqs: int, num_logits: int, is_decode: bool,
                 blocks_per_seq: int) -> StepShape:
        """The shape a step of these real sizes (`blocks_per_seq`: its widest block table) is padded to;
        raises if it fits no bucket."""
        padded_tokens = self.buckets.pad_num_tokens(num_tokens)
        padded_seqs = self.buckets.pad_num_seqs(num_seqs)
        if padded_tokens is None or padded_seqs is None:
            raise ValueError(f"a step of {num_tokens} tokens and {num_seqs} sequences exceeds the largest shape "
                             f"buckets ({self.buckets.num_tokens[-1]} tokens, {self.buckets.num_seqs[-1]} sequences)")
        width = ShapeBuckets._bucket(self.widths, blocks_per_seq)
        if width is None:  # only reachable past max_model_len
            raise ValueError(f"a block table of {blocks_per_seq} blocks exceeds the model's {self.max_blocks_per_seq} "
                             "blocks per sequence")
        logits = padded_seqs if num_logits <= padded_seqs else padded_tokens
        return StepShape(num_tokens=padded_tokens, num_seqs=padded_seqs, blocks_per_seq=width, num_logits=logits,
                         is_decode=is_decode)

    def max_seq_len_of(self, width: int) -> int:
        """`max_seq_len` of a padded step whose block tables are `width` blocks wide."""
        return self.max_seq_len if width >= self.max_blocks_per_seq else width * self.block_size


def build_step_inputs(steps: Sequence[SequenceStep], block_size: int, device: torch.device,
                      padding: StepPadding | None = None) -> StepInputs:
    """Flatten `steps` into model inputs; tokens of each sequence stay contiguous, in order.

    With `padding`, the inputs are padded to the step's `StepShape` as `StepPadding` describes.
    """
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
    prefill_lens = np.fromiter((s.rope_prefill_length for s in steps), dtype=np.int64, count=len(steps))
    rope_lengths = np.maximum(prefill_lens[seq_of_token], positions + 1)  # see AttentionMetadata.rope_lengths

    seq_lens = starts + query_lens
    num_logits = np.fromiter((s.num_logits for s in steps), dtype=np.int64, count=len(steps))
    logits_indices = np.concatenate(
        [np.arange(end - n, end) for end, n in zip(cu_query[1:], num_logits) if n]
    ) if num_logits.any() else np.zeros(0, dtype=np.int64)
    if padding is not None:
        inputs = _padded_inputs(padding, token_ids, positions, cu_query, seq_lens, block_tables, slot_mapping,
                                logits_indices, int(query_lens.max()) == 1, device, rope_lengths)
        inputs.lora = _lora_batch(steps, query_lens, inputs.input_ids.shape[0], device)
        return inputs

    # A sequence decodes once past its prompt (known where rope_prefill_length is), a logit per token it feeds;
    # the scheduler puts decodes first.
    decoding = (prefill_lens > 0) & (prefill_lens <= starts) & (num_logits == query_lens)
    metadata = AttentionMetadata(
        query_start_loc=host_to_device(cu_query.astype(np.int32), device),
        seq_lens=host_to_device(seq_lens.astype(np.int32), device),
        block_tables=host_to_device(block_tables.astype(np.int32), device),
        slot_mapping=host_to_device(slot_mapping, device),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        rope_lengths=host_to_device(rope_lengths, device),
        num_decode_tokens=int((np.cumprod(decoding) * query_lens).sum()),  # the leading decodes' tokens
    )
    return StepInputs(
        input_ids=host_to_device(token_ids, device),
        positions=host_to_device(positions, device),
        metadata=metadata,
        logits_indices=host_to_device(logits_indices, device),
        lora=_lora_batch(steps, query_lens, num_tokens, device),
    )


def _lora_batch(steps: Sequence[SequenceStep], query_lens: np.ndarray, num_tokens: int,
                device: torch.device) -> LoRABatch | None:
    """Which adapter each of the step's `num_tokens` (padding included) uses, grouped by adapter; None
    when every sequence uses the base model."""
    adapters = np.fromiter((s.adapter for s in steps), dtype=np.int64, count=len(steps))
    if not adapters.any():
        return None
    packed, segments = group_by_slot(np.repeat(adapters, query_lens), num_tokens)
    sent = host_to_device(packed, device)  # one copy: every token's slot, then the adapter rows by slot
    return LoRABatch(sent[:num_tokens], sent[num_tokens:], segments)


def _padded_inputs(padding: StepPadding, token_ids: np.ndarray, positions: np.ndarray, cu_query: np.ndarray,
                   seq_lens: np.ndarray, block_tables: np.ndarray, slot_mapping: np.ndarray,
                   logits_indices: np.ndarray, is_decode: bool, device: torch.device,
                   rope_lengths: np.ndarray) -> StepInputs:
    """The step's unpadded host arrays, padded to its `StepShape` (see `StepPadding`) and sent over."""
    num_tokens, num_seqs, num_logits = len(token_ids), len(seq_lens), len(logits_indices)
    width = block_tables.shape[1]
    shape = padding.shape_of(num_tokens, num_seqs, num_logits, is_decode, width)

    def pad(values: np.ndarray, size: int, fill: int) -> np.ndarray:
        out = np.full(size, fill, dtype=np.int64)
        out[: len(values)] = values
        return out

    padded_tables = np.zeros((shape.num_seqs, shape.blocks_per_seq), dtype=np.int32)
    padded_tables[:num_seqs, :width] = block_tables
    metadata = AttentionMetadata(
        query_start_loc=host_to_device(pad(cu_query, shape.num_seqs + 1, num_tokens).astype(np.int32), device),
        seq_lens=host_to_device(pad(seq_lens, shape.num_seqs, 0).astype(np.int32), device),
        block_tables=host_to_device(padded_tables, device),
        slot_mapping=host_to_device(pad(slot_mapping, shape.num_tokens, -1), device),
        max_query_len=1 if is_decode else shape.num_tokens,
        max_seq_len=padding.max_seq_len_of(shape.blocks_per_seq),
        rope_lengths=host_to_device(pad(rope_lengths, shape.num_tokens, 1), device),
    )
    return StepInputs(
        input_ids=host_to_device(pad(token_ids, shape.num_tokens, 0), device),
        positions=host_to_device(pad(positions, shape.num_tokens, 0), device),
        metadata=metadata,
        logits_indices=host_to_device(pad(logits_indices, shape.num_logits, 0), device),
        num_logits=num_logits,
    )


def _merged_embeddings(steps: Sequence[SequenceStep], device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows of the flattened batch, their embeddings) over every step that brings some; None if none does.
    Real tokens come first and in sequence order, padded or not, so a row is its sequence's start plus offset."""
    if all(step.embeddings is None for step in steps):
        return None
    indices, rows, start = [], [], 0
    for step in steps:
        if step.embeddings is not None:
            indices.extend(start + offset for offset in step.embeddings.offsets)
            rows.append(step.embeddings.rows)
        start += len(step.token_ids)
    return host_to_device(np.asarray(indices, dtype=np.int64), device), torch.cat(rows).to(device)


def step_shape(inputs: StepInputs) -> StepShape:
    """The shape of padded `inputs`, read from host-side sizes only."""
    return StepShape(num_tokens=inputs.input_ids.shape[0], num_seqs=inputs.metadata.num_seqs,
                     blocks_per_seq=inputs.metadata.block_tables.shape[1],
                     num_logits=inputs.logits_indices.shape[0], is_decode=inputs.metadata.max_query_len == 1)


class ModelRunner:
    """Runs one step of a model over the paged KV cache.

    With `padding` (the backend declared `ShapeBuckets`), every step is padded to a static shape and
    `step_shapes` holds each shape run so far: for a backend that compiles per shape, one compilation each.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        forward: Any,  # the model's forward, possibly compiled by the backend
        kv_caches: list[torch.Tensor],
        attention_backends: Sequence[AttentionBackend],
        block_size: int,
        device: torch.device,
        padding: StepPadding | None = None,
        logits_device: torch.device | None = None,
        inference_mode: bool = True,
        lora: LoRAAdapters | None = None,
    ):
        self.model = model
        self.forward = forward
        self.kv_caches = kv_caches
        self.attention_backends = list(attention_backends)
        self.block_size = block_size
        self.device = device
        self.padding = padding
        self.logits_device = logits_device  # where the sampler wants the logits; None: on `device`
        self.grad_mode = torch.inference_mode if inference_mode else torch.no_grad
        self.lora = lora  # the model's LoRA adapters, told each step which tokens use which
        self.step_shapes: set[StepShape] = set()

    @property
    def num_step_shapes(self) -> int:
        """Distinct padded shapes run so far (0 without padding): the backend's compilations."""
        return len(self.step_shapes)

    def execute(self, steps: Sequence[SequenceStep]) -> torch.Tensor:
        """Logits (num_logits, vocab) in float32 for the positions the steps asked for, in order."""
        with self.grad_mode():
            return self._execute(steps)

    def _execute(self, steps: Sequence[SequenceStep]) -> torch.Tensor:
        inputs = build_step_inputs(steps, self.block_size, self.device, self.padding)
        for backend in self.attention_backends:
            backend.prepare(inputs.metadata)
        if self.lora is not None:
            self.lora.begin_step(inputs.lora)
        embeddings = _merged_embeddings(steps, self.device)
        decodes = inputs.metadata.num_decode_tokens
        with batch_rows.running(inputs.input_ids.shape[0], decodes):
            if embeddings is None:
                hidden = self.forward(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
            else:  # a prefill step with image rows: the model's own forward, never a captured decode step
                hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata,
                                    input_embeddings=embeddings)
        with batch_rows.running(inputs.logits_indices.shape[0], decodes):
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if self.logits_device is not None:  # moved whole, padded rows too: a copy of a static shape
            logits = logits.to(self.logits_device)
        if self.padding is None:
            return logits
        self.step_shapes.add(step_shape(inputs))
        return logits[: inputs.num_logits]  # a view: the padded rows never reach the sampler
