"""Paged attention for Gaudi in plain torch, with static shapes: every tensor's size follows the padded
step's shape (tokens, sequences, block-table width), never its data, so one HPU graph serves every step
padded to that shape, and the same code runs on host tensors where tests check it against the reference.

The cache of a layer is one tensor ``(2, num_blocks, block_size + 1, num_kv_heads, head_dim)``: keys then
values, token-major within a block, so a token's write is one row of a flat view and a block's rows
gather as ``(positions, kv_heads, head_dim)``. The extra row of each block is scratch: padding tokens
(slot -1) write to block 0's, which no position maps to, so the cache write is one ``index_copy_`` of
every token with no data-dependent shape.

Attention runs over *rows*, each one query with a context length and a block-table row. A decode step
(``max_query_len`` 1) has a row per sequence; any other step a row per token, whose context ends at the
token's own position (causality without a query-by-query mask). A row gathers its context's keys and
values through its table (``width * block_size`` positions), scores them, masks the positions past its
context (and before a sliding window), softmaxes in float32 with a finite fill so a row with no context
(a padding sequence or token) stays finite, and sums the values. Rows go in chunks whose gathered keys
and values stay under `CHUNK_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tokenmill.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec, KVCacheLayout, KVCacheShape

DEFAULT_BLOCK_SIZE = 128  # Gaudi's serving stacks' block size: a block's rows fill the matrix engine's tiles
CHUNK_BYTES = 256 << 20  # gathered keys, values and scores of one chunk of rows
MASKED = torch.finfo(torch.float32).min  # finite: a row with nothing to attend gets uniform weights, not NaN


class GaudiKVCacheLayout(KVCacheLayout):
    """Blocks as ``(2, num_blocks, block_size + 1, num_kv_heads, head_dim)`` per layer; the last row of a
    block is scratch for the writes of padding tokens."""

    cache_dtypes = ("auto",)  # its attention reads keys and values in the model's dtype only

    def __init__(self, shape: KVCacheShape, device: torch.device, block_size: int = DEFAULT_BLOCK_SIZE):
        self.shape = shape
        self.device = device
        self.block_size = block_size
        self.rows_per_block = block_size + 1

    def bytes_per_block(self) -> int:
        s = self.shape
        return 2 * s.num_layers * self.rows_per_block * s.num_kv_heads * s.head_dim * s.dtype.itemsize

    def allocate(self, num_blocks: int) -> list[torch.Tensor]:
        # Zeros, not empty: a padded row attends over blocks no sequence wrote, and garbage could be NaN.
        s = self.shape
        shape = (2, num_blocks, self.rows_per_block, s.num_kv_heads, s.head_dim)
        return [torch.zeros(shape, dtype=s.dtype, device=self.device) for _ in range(s.num_layers)]

    def copy_blocks(self, caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in caches:
            cache.index_copy_(1, dst, cache.index_select(1, src))

    def cache_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Row of the flat ``(num_blocks * rows_per_block, kv_heads, head_dim)`` view for each cache slot;
        slot -1 (write nothing) maps to block 0's scratch row."""
        rows = slots // self.block_size * self.rows_per_block + slots % self.block_size
        return torch.where(slots < 0, torch.full_like(slots, self.block_size), rows)


@dataclass
class _Rows:
    """The step's attention rows, shared by every layer (computed by the first that runs)."""

    query_index: torch.Tensor  # (rows,) the token whose query each row attends with
    context_lens: torch.Tensor  # (rows,) int64 positions each row sees: 0 .. len - 1 (0: none)
    kv_index: torch.Tensor  # (rows, width * block_size) flat cache row of each context position
    token_rows: torch.Tensor | None  # (tokens,) the row each token's output is; None: row i is token i


def build_rows(meta: AttentionMetadata, layout: GaudiKVCacheLayout) -> _Rows:
    """Rows of a step: one per sequence for a decode step, else one per token; sizes fixed by the shape."""
    num_tokens, num_seqs = meta.slot_mapping.shape[0], meta.seq_lens.shape[0]
    device = meta.seq_lens.device
    starts = meta.query_start_loc.long()
    seq_lens = meta.seq_lens.long()
    tokens = torch.arange(num_tokens, device=device)
    # Sequences whose queries end at or before each token: its own sequence for a real token, the last
    # sequence for a padding token (whose output nothing reads). A compare, not a data-dependent search.
    seq_of_token = (tokens[:, None] >= starts[None, 1:]).sum(1).clamp(max=num_seqs - 1)
    if meta.max_query_len == 1:
        query_index = starts[:-1].clamp(max=num_tokens - 1)
        context_lens, tables, token_rows = seq_lens, meta.block_tables, seq_of_token
    else:
        query_index, token_rows = tokens, None
        position = seq_lens[seq_of_token] - (starts[seq_of_token + 1] - tokens)
        context_lens = torch.where(tokens < starts[-1], position + 1, torch.zeros_like(position))
        tables = meta.block_tables[seq_of_token]
    width = tables.shape[1] * layout.block_size
    positions = torch.arange(width, device=device)
    blocks = tables.long()[:, positions // layout.block_size]
    kv_index = blocks * layout.rows_per_block + positions % layout.block_size
    return _Rows(query_index, context_lens, kv_index, token_rows)


class GaudiPagedAttention(AttentionBackend):
    """Static-shape paged attention over `GaudiKVCacheLayout`, in torch ops the HPU graph compiler lowers."""

    def __init__(self, spec: AttentionSpec, layout: GaudiKVCacheLayout, chunk_bytes: int = CHUNK_BYTES):
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"{spec.num_heads} query heads do not group evenly over {spec.num_kv_heads} KV heads")
        self.spec = spec
        self.layout = layout
        self.chunk_bytes = chunk_bytes
        self._key = ("gaudi_rows", layout.block_size)

    def prepare(self, metadata: AttentionMetadata) -> None:
        # Nothing ahead of the layers: the rows are built by the first layer, inside the step's HPU graph,
        # where the metadata the graph rebuilds from its inputs is the one the layers see.
        pass

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        slots = self.layout.cache_rows(metadata.slot_mapping.long())
        flat = kv_cache.view(2, -1, self.spec.num_kv_heads, self.spec.head_dim)
        flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
        flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))
        rows = metadata.backend_data.get(self._key)
        if rows is None:
            rows = metadata.backend_data[self._key] = build_rows(metadata, self.layout)
        out = self._attend(query, flat[0], flat[1], rows)
        return out if rows.token_rows is None else out[rows.token_rows]

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: _Rows) -> torch.Tensor:
        num_rows, width = rows.kv_index.shape
        s = self.spec
        # Per row: gathered keys and values, their float32 copies, float32 scores and weights.
        row_bytes = width * (2 * s.num_kv_heads * s.head_dim * (keys.element_size() + 4) + 2 * s.num_heads * 4)
        chunk = max(1, self.chunk_bytes // row_bytes)
        outs = [self._attend_rows(query[rows.query_index[i : i + chunk]], keys, values, rows.kv_index[i : i + chunk],
                                  rows.context_lens[i : i + chunk]) for i in range(0, num_rows, chunk)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attend_rows(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kv_index: torch.Tensor,
                     context_lens: torch.Tensor) -> torch.Tensor:
        s = self.spec
        num_rows, width = kv_index.shape
        q = query.view(num_rows, s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim)
        k, v = keys[kv_index], values[kv_index]  # (rows, width, kv_heads, head_dim)
        scores = torch.einsum("rkgd,rlkd->rkgl", q.float(), k.float()) * s.scale
        if s.logit_softcap is not None:
            scores = s.logit_softcap * torch.tanh(scores / s.logit_softcap)
        positions = torch.arange(width, device=kv_index.device)
        visible = positions[None, :] < context_lens[:, None]
        if s.sliding_window is not None:
            visible &= positions[None, :] >= (context_lens - s.sliding_window)[:, None]
        scores = scores.masked_fill(~visible[:, None, None, :], MASKED)
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("rkgl,rlkd->rkgd", probs, v.float())
        return out.reshape(num_rows, s.num_heads, s.head_dim).to(query.dtype)
