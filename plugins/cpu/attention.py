"""Paged attention on the CPU: one batched gather plus one SDPA call per layer, no loop over sequences.

The KV cache of a layer is one tensor ``(2, num_blocks, block_size, num_kv_heads, head_dim)``. Each step,
`prepare` turns the block tables into a padded ``(num_seqs, max_seq_len)`` slot index and a boolean mask
``(num_seqs, 1, max_query_len, max_seq_len)``; every layer then gathers its keys and values with that
index and runs ``scaled_dot_product_attention`` over the padded batch. Padding costs work when query
lengths differ a lot, which chunked prefill keeps bounded; decode-only steps pad nothing on the query
side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from tokenmill.interfaces import (
    AttentionBackend,
    AttentionMetadata,
    AttentionSpec,
    KVCacheLayout,
    KVCacheShape,
)

DEFAULT_BLOCK_SIZE = 16


class CPUKVCacheLayout(KVCacheLayout):
    """Blocks as ``(2, num_blocks, block_size, num_kv_heads, head_dim)`` per layer, keys then values."""

    def __init__(self, shape: KVCacheShape, device: torch.device, block_size: int = DEFAULT_BLOCK_SIZE):
        self.shape = shape
        self.device = device
        self.block_size = block_size

    def bytes_per_block(self) -> int:
        s = self.shape
        element_size = torch.empty((), dtype=s.dtype).element_size()
        return 2 * s.num_layers * self.block_size * s.num_kv_heads * s.head_dim * element_size

    def allocate(self, num_blocks: int) -> list[torch.Tensor]:
        s = self.shape
        return [
            torch.zeros(2, num_blocks, self.block_size, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=self.device)
            for _ in range(s.num_layers)
        ]

    def copy_blocks(self, caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in caches:
            cache[:, dst] = cache[:, src]


@dataclass
class _StepIndex:
    """Per-step gather indices and masks, shared by every layer with the same sliding window."""

    token_to_padded: torch.Tensor  # (num_tokens,) row of each query token in the padded (B * max_q) layout
    kv_slots: torch.Tensor  # (B, max_seq_len) cache slot of each context position (0 where padding)
    mask: torch.Tensor  # (B, 1, max_q, max_seq_len) True where the query may attend


def _build_step_index(meta: AttentionMetadata, block_size: int, sliding_window: int | None) -> _StepIndex:
    device = meta.seq_lens.device
    num_seqs, max_q, max_kv = meta.num_seqs, meta.max_query_len, meta.max_seq_len
    starts = meta.query_start_loc[:-1].long()
    query_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    seq_lens = meta.seq_lens.long()

    num_tokens = int(meta.slot_mapping.shape[0])
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens, output_size=num_tokens)
    offset_in_query = torch.arange(num_tokens, device=device) - starts[seq_of_token]
    token_to_padded = seq_of_token * max_q + offset_in_query

    positions = torch.arange(max_kv, device=device)
    blocks = meta.block_tables.long().gather(1, (positions // block_size).expand(num_seqs, -1).clamp(
        max=meta.block_tables.shape[1] - 1))
    kv_slots = blocks * block_size + positions % block_size

    # Query row r of sequence b sits at absolute position (seq_len - query_len + r).
    query_positions = (seq_lens - query_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
    mask = positions[None, None, :] <= query_positions[:, :, None]
    if sliding_window is not None:
        mask &= positions[None, None, :] > query_positions[:, :, None] - sliding_window
    # Padded query rows (past the query length) attend to position 0 only, so softmax stays finite.
    is_padding = torch.arange(max_q, device=device)[None, :] >= query_lens[:, None]
    mask[is_padding] = positions == 0
    return _StepIndex(token_to_padded, kv_slots, mask[:, None])


class CPUPagedAttention(AttentionBackend):
    """Prefill, chunked prefill and decode in one batched call, for layers of one `AttentionSpec`."""

    def __init__(self, spec: AttentionSpec, layout: KVCacheLayout):
        self.spec = spec
        self.block_size = layout.block_size
        self._key = ("cpu-attention", spec.sliding_window)

    def prepare(self, metadata: AttentionMetadata) -> None:
        if self._key not in metadata.backend_data:
            metadata.backend_data[self._key] = _build_step_index(metadata, self.block_size, self.spec.sliding_window)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        spec = self.spec
        index: _StepIndex = metadata.backend_data[self._key]
        num_seqs, max_q = metadata.num_seqs, metadata.max_query_len

        flat_cache = kv_cache.view(2, -1, spec.num_kv_heads, spec.head_dim)
        flat_cache[0].index_copy_(0, metadata.slot_mapping, key.to(kv_cache.dtype))
        flat_cache[1].index_copy_(0, metadata.slot_mapping, value.to(kv_cache.dtype))

        # (B, max_seq_len, kv_heads, D) -> (B, kv_heads, max_seq_len, D)
        keys = flat_cache[0][index.kv_slots].transpose(1, 2).to(query.dtype)
        values = flat_cache[1][index.kv_slots].transpose(1, 2).to(query.dtype)

        padded = query.new_zeros(num_seqs * max_q, spec.num_heads, spec.head_dim)
        padded[index.token_to_padded] = query
        padded = padded.view(num_seqs, max_q, spec.num_heads, spec.head_dim).transpose(1, 2)

        if spec.logit_softcap is None:
            out = F.scaled_dot_product_attention(
                padded, keys, values, attn_mask=index.mask, scale=spec.scale,
                enable_gqa=spec.num_heads != spec.num_kv_heads,
            )
        else:
            out = _softcapped_attention(padded, keys, values, index.mask, spec)
        out = out.transpose(1, 2).reshape(num_seqs * max_q, spec.num_heads, spec.head_dim)
        return out[index.token_to_padded]


def _softcapped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, spec: AttentionSpec
) -> torch.Tensor:
    """Attention with Gemma 2's tanh soft cap on the scores, which SDPA cannot express."""
    group = spec.num_heads // spec.num_kv_heads
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = (query @ keys.transpose(-1, -2)) * spec.scale
    scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values
