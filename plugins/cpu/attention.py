"""Paged attention on the CPU: one batched gather plus one SDPA call per layer, no loop over sequences.

The KV cache of a layer is one tensor ``(2, num_blocks, num_kv_heads, block_size, head_dim)``: head-major
inside a block, so the decode kernel reads each head's rows of a block as one contiguous run. Each step,
`prepare` splits the sequences into decodes and prefill chunks and turns each group's block tables into a
padded ``(num_seqs, num_kv_heads, max_seq_len)`` row index and a boolean mask ``(num_seqs, 1,
max_query_len, max_seq_len)``; every layer then gathers its keys and values with that index and runs
``scaled_dot_product_attention`` once per group; decodes go to a compiled kernel that reads the blocks
in place instead. Grouping keeps a 2,000-token chunk from padding every decode beside it to 2,000 query
rows; decodes need no query padding at all.

Short queries (at most `MAX_ROW_QUERY` tokens: speculative decoding's verification, the tail of a
prompt) go to the decode kernel too, each query token as a row of its own whose context ends at its
position (`row_contexts`). A row's arithmetic is then the one a one-token decode at that position gets,
so a verified draft token's logits are bit for bit those plain decoding would have computed, and
greedy output is the same with and without `--speculate` at any dtype (decode_stack.py does the same).
So do longer queries (prompts) over contexts whose keys and values stay in cache (`row_context_limit`:
8,192 tokens at head size 64 in bf16, 4,096 at 128), where the rows are faster than SDPA; a prompt's
logits are then those token-by-token decoding would compute.

A padded step (a backend with shape buckets, see `AttentionMetadata`) runs as the unpadded step of its
real rows: the padding tokens are neither written to the cache nor attended, and their output is zero.

Quantized caches (`--kv-cache-dtype` int8, fp8_e4m3, fp8_e5m2): each row of a block is then `head_dim`
one-byte codes followed by the row's bfloat16 scale, a uint8 tensor ``(2, num_blocks, num_kv_heads,
block_size, head_dim + 2)``; rows are quantized as they are written (tokenmill.kv_cache_dtype, one scale
per token and kv head), and the decode kernel converts codes as it loads them; the gather path
dequantizes the rows it gathers. A bfloat16 cache under a float32 model is read the same way, converted.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill.interfaces import (
    AttentionBackend,
    AttentionMetadata,
    AttentionSpec,
    KVCacheLayout,
    KVCacheShape,
)
from tokenmill.kv_cache_dtype import (
    KV_CACHE_DTYPES,
    QUANTIZED_FORMATS,
    SCALES_PER_TOKEN_HEAD,
    QuantizedFormat,
    dequantize_rows,
    quantize_rows,
    quantized_row_bytes,
)
from tokenmill.plugins.cpu.kernels import CACHE_CODES, decode_attention_kernel_available, paged_decode_attention

DEFAULT_BLOCK_SIZE = 16
CAUSAL = "causal"  # a group mask meaning: SDPA's own is_causal
# Queries up to this long are attended row by row by the decode kernel: `--speculate` up to 15 drafts.
MAX_ROW_QUERY = 16
# Longer queries (prompts) too while one (sequence, kv head)'s keys and values take at most this many
# bytes: each row reads them again, from cache. Up to there rows beat PyTorch's flash kernel at every prompt
# length measured (SmolLM2, 60 to 8,000 tokens: 0.60-0.76x the prefill time, benchmarks/NOTES.md section
# 23); beyond it, where the re-reads would come from memory, SDPA keeps them.
ROW_CONTEXT_BYTES = 2 << 20


def row_context_limit(spec: AttentionSpec) -> int:
    """The longest context a query longer than MAX_ROW_QUERY is attended row by row over."""
    return ROW_CONTEXT_BYTES // (2 * spec.head_dim * spec.dtype.itemsize)


def attends_by_rows(meta: AttentionMetadata, spec: AttentionSpec) -> bool:
    """Whether every query of the step goes row by row to the decode kernel (where the backend has it)."""
    return meta.max_query_len <= MAX_ROW_QUERY or meta.max_seq_len <= row_context_limit(spec)


class CPUKVCacheLayout(KVCacheLayout):
    """Blocks as ``(2, num_blocks, num_kv_heads, block_size, row)`` per layer, keys then values; a row is
    head_dim elements of the cache dtype, or of a quantized cache head_dim codes and a bfloat16 scale."""

    cache_dtypes = KV_CACHE_DTYPES
    kv_scales = SCALES_PER_TOKEN_HEAD

    def __init__(self, shape: KVCacheShape, device: torch.device, block_size: int = DEFAULT_BLOCK_SIZE):
        self.shape = shape
        self.device = device
        self.block_size = block_size
        self.format: QuantizedFormat | None = QUANTIZED_FORMATS.get(shape.cache_dtype)
        if self.format is not None:
            self.storage_dtype, self.row_width = torch.uint8, quantized_row_bytes(shape.head_dim)
        else:
            self.storage_dtype = torch.bfloat16 if shape.cache_dtype == "bfloat16" else shape.dtype
            self.row_width = shape.head_dim
        # What the decode kernel is told the cache holds.
        self.cache_code = CACHE_CODES[shape.cache_dtype if self.format is not None else self.storage_dtype]

    def bytes_per_block(self) -> int:
        s = self.shape
        return 2 * s.num_layers * self.block_size * s.num_kv_heads * self.row_width * self.storage_dtype.itemsize

    def allocate(self, num_blocks: int) -> list[torch.Tensor]:
        s = self.shape
        shape = (2, num_blocks, s.num_kv_heads, self.block_size, self.row_width)
        return [_zeros_committed_on_write(shape, self.storage_dtype) for _ in range(s.num_layers)]

    def copy_blocks(self, caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in caches:
            cache[:, dst] = cache[:, src]

    def resident_block_limit(self, num_blocks: int) -> int | None:
        # Pages are committed on first write (see allocate), so retaining freed prefixes costs memory:
        # keep RESIDENT_CACHE_BYTES' worth before reusing them.
        return min(num_blocks, max(1, RESIDENT_CACHE_BYTES // self.bytes_per_block()))


# Cached prefixes kept resident beyond the working set's own blocks; 512 MiB holds ~23k tokens of
# SmolLM2-135M, many system prompts and long documents.
RESIDENT_CACHE_BYTES = 512 * 2**20


def _zeros_committed_on_write(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages the OS commits on first write (an anonymous mapping; torch.zeros would write
    every byte up front), so with the block manager handing out used blocks first, resident memory follows the
    working set, not the pool. On 4 KiB pages: a first write to a block on a transparent huge page zeroes 2 MiB
    at once, and under a hypervisor that took a 1,000-token prefill from 240 to 400-520 ms while the cache was
    still cold (240 throughout on small pages); decode steps run as fast on either (benchmarks/NOTES.md 32).
    """
    num_bytes = math.prod(shape) * dtype.itemsize
    mapping = mmap.mmap(-1, max(num_bytes, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    # numpy's array keeps the mapping alive for as long as the tensor lives.
    return torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8, count=num_bytes)).view(dtype).view(shape)

@dataclass
class _Group:
    """Sequences attended together: gather indices and mask padded to the group's own longest query."""

    token_index: torch.Tensor | None  # (group_tokens,) rows of the step's tokens; None = all, in order
    token_to_padded: torch.Tensor | None  # row of each group token in the padded (B * max_q) layout; None if unpadded
    # Gather index and mask, None for queries the compiled decode kernel takes (it reads the blocks in place):
    kv_rows: torch.Tensor | None  # (B, kv_heads, max_seq_len) cache row of each context position (block 0 where padding)
    mask: torch.Tensor | str | None  # (B, 1, max_q, max_seq_len) True where the query may attend;
    # None = attend all; CAUSAL: one whole prompt, causality left to SDPA
    num_seqs: int
    max_query_len: int
    # For the compiled decode kernel, per query token where it takes the group (`row_contexts`), else per sequence:
    block_tables: torch.Tensor  # (rows, max_blocks) int32
    seq_lens: torch.Tensor  # (rows,) int32
    total_positions: int


def row_contexts(query_lens: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                 num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query token as a one-token decode: its sequence's block table and the context it attends to
    (row r of a sequence whose query has q tokens sees its first seq_len - q + r + 1 positions)."""
    query_lens = query_lens.long()
    seq_of_row = torch.repeat_interleave(torch.arange(len(query_lens), device=query_lens.device), query_lens,
                                         output_size=num_tokens)
    ends = torch.cumsum(query_lens, 0)
    rows = torch.arange(num_tokens, device=query_lens.device)
    # seq_len - (end - row) is the token's position; it attends up to and including itself.
    row_lens = seq_lens.long()[seq_of_row] - ends[seq_of_row] + rows + 1
    return block_tables[seq_of_row].contiguous(), row_lens.to(torch.int32)


def _cache_rows(blocks: torch.Tensor, offsets: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """Row of the flattened ``(2, rows, head_dim)`` cache per (position, kv head): shape ``blocks.shape
    + (num_kv_heads,)``."""
    heads = torch.arange(num_kv_heads, device=blocks.device)
    return ((blocks * num_kv_heads).unsqueeze(-1) + heads) * block_size + offsets.unsqueeze(-1)


def _build_group(meta: AttentionMetadata, seqs: torch.Tensor | None, block_size: int, spec: AttentionSpec,
                 kernel_decodes: bool) -> _Group:
    """Index and mask for the sequences `seqs` of the step (None: every sequence, tokens in order)."""
    device = meta.seq_lens.device
    starts = meta.query_start_loc[:-1].long()
    query_lens = (meta.query_start_loc[1:] - starts).long()
    seq_lens = meta.seq_lens.long()
    block_tables = meta.block_tables
    if seqs is not None:
        starts, query_lens, seq_lens, block_tables = starts[seqs], query_lens[seqs], seq_lens[seqs], block_tables[seqs]
    num_seqs = int(seq_lens.shape[0])
    max_q, max_kv = int(query_lens.max()), int(seq_lens.max())

    kv_rows = mask = None
    by_rows = kernel_decodes and bool(((query_lens <= MAX_ROW_QUERY) | (seq_lens <= row_context_limit(spec))).all())
    if not by_rows:
        positions = torch.arange(max_kv, device=device)
        blocks = block_tables.long().gather(1, (positions // block_size).expand(num_seqs, -1).clamp(
            max=block_tables.shape[1] - 1))
        kv_rows = _cache_rows(blocks, (positions % block_size).expand(num_seqs, -1), spec.num_kv_heads,
                              block_size).transpose(1, 2).contiguous()
        mask = _mask(seq_lens, query_lens, max_q, max_kv, spec)

    token_index = token_to_padded = None
    group_tokens = int(query_lens.sum())
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens, output_size=group_tokens)
    offset_in_query = torch.arange(group_tokens, device=device) - (torch.cumsum(query_lens, 0) - query_lens)[seq_of_token]
    if seqs is not None:
        token_index = starts[seq_of_token] + offset_in_query
    if by_rows and max_q > 1:
        block_tables, seq_lens = row_contexts(query_lens, seq_lens, block_tables, group_tokens)
    elif max_q > 1:
        token_to_padded = seq_of_token * max_q + offset_in_query
    return _Group(token_index, token_to_padded, kv_rows, mask, num_seqs, max_q,
                  block_tables.contiguous(), seq_lens.to(torch.int32).contiguous(), int(seq_lens.sum()))


def _mask(seq_lens: torch.Tensor, query_lens: torch.Tensor, max_q: int, max_kv: int, spec: AttentionSpec):
    """What the group's queries may attend to, in the form the attention call runs fastest with.

    PyTorch's CPU flash kernel skips the key blocks its own causal flag rules out but reads a boolean
    mask whole: a lone 1,000-token prompt attends ~1.5x faster (measured 22 -> 14 ms a layer). So one
    whole prompt without a window or soft cap gets CAUSAL. A chunk after cached positions gets the boolean
    mask: PyTorch's lower-right `CausalBias` is materialized as that very mask on the CPU (same output and
    time), and importing it imports torch._dynamo, 1.6 s of the server's start.
    """
    if (len(seq_lens) == 1 and max_q > 1 and max_q == max_kv and spec.sliding_window is None
            and spec.logit_softcap is None):
        return CAUSAL
    device = seq_lens.device
    positions = torch.arange(max_kv, device=device)
    # Query row r of a sequence sits at absolute position (seq_len - query_len + r).
    query_positions = (seq_lens - query_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
    mask = positions[None, None, :] <= query_positions[:, :, None]
    if spec.sliding_window is not None:
        mask &= positions[None, None, :] > query_positions[:, :, None] - spec.sliding_window
    # Padded query rows (past the query length) attend to position 0 only, so softmax stays finite.
    is_padding = torch.arange(max_q, device=device)[None, :] >= query_lens[:, None]
    mask[is_padding] = positions == 0
    if max_q == 1 and spec.sliding_window is None and bool((seq_lens == max_kv).all()):
        return None  # decodes of equal length attend to everything gathered
    return mask[:, None]


def _without_padding(meta: AttentionMetadata) -> AttentionMetadata | None:
    """The step's real rows as metadata of their own, or None when the step has no padding.

    Padding tokens are the rows from ``query_start_loc[-1]`` on and padding sequences those with
    seq_len 0, both after the real ones (`AttentionMetadata`). Two scalar reads tell an unpadded step.
    """
    num_tokens = int(meta.query_start_loc[-1])
    num_seqs = int(torch.count_nonzero(meta.seq_lens))
    if num_tokens == meta.slot_mapping.shape[0] and num_seqs == meta.seq_lens.shape[0]:
        return None
    return AttentionMetadata(meta.query_start_loc[: num_seqs + 1], meta.seq_lens[:num_seqs],
                             meta.block_tables[:num_seqs], meta.slot_mapping[:num_tokens],
                             meta.max_query_len, meta.max_seq_len)


def _build_groups(meta: AttentionMetadata, block_size: int, spec: AttentionSpec,
                  kernel_decodes: bool) -> list[_Group]:
    """Decodes in one group (with the short queries the decode kernel takes row by row); prefill chunks
    grouped by length class (within 2x of each other).

    Padding is per group, so a 2,000-token chunk never pads the decodes or a 30-token chunk beside it
    to 2,000 query rows. A step has at most one group per power of two, never one per sequence.
    """
    if meta.max_query_len == 1 or (kernel_decodes and attends_by_rows(meta, spec)):
        return [_build_group(meta, None, block_size, spec, kernel_decodes)]
    query_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    decodes = query_lens <= 1
    if kernel_decodes:
        decodes = (query_lens <= MAX_ROW_QUERY) | (meta.seq_lens.long() <= row_context_limit(spec))
    length_class = torch.where(decodes, 0, 1 + torch.log2(query_lens.double()).ceil().long())
    classes = torch.unique(length_class)
    if classes.numel() == 1:
        return [_build_group(meta, None, block_size, spec, kernel_decodes)]
    return [_build_group(meta, (length_class == c).nonzero().flatten(), block_size, spec, kernel_decodes)
            for c in classes]


class CPUPagedAttention(AttentionBackend):
    """Prefill, chunked prefill and decode in one batched call, for layers of one `AttentionSpec`."""

    def __init__(self, spec: AttentionSpec, layout: CPUKVCacheLayout):
        self.spec = spec
        self.block_size = layout.block_size
        self.format = layout.format  # None: the cache stores plain values
        self.cache_code = layout.cache_code
        self.storage_dtype = layout.storage_dtype
        # The query and cache dtypes are fixed, so whether decodes take the kernel is known now.
        self.kernel_decodes = decode_attention_kernel_available(spec.dtype) and spec.logit_softcap is None
        # Everything `_step_data` depends on: layers that agree on it share one step's index.
        self._key = ("cpu-attention", spec.sliding_window, spec.logit_softcap is None, spec.num_kv_heads,
                     self.kernel_decodes)

    def prepare(self, metadata: AttentionMetadata) -> None:
        # Nothing up front: the first layer that attends builds the step's index (`_step_data`), so a
        # step the decode stack runs in C (decode_stack.py, no layer calls forward) builds none.
        pass

    def _step_data(self, metadata: AttentionMetadata) -> tuple[torch.Tensor, list[_Group], int | None]:
        """The step's cache rows to write, attention groups and real token count (None: no padding),
        built once and shared by every layer."""
        data = metadata.backend_data.get(self._key)
        if data is None:
            real = _without_padding(metadata)
            meta = metadata if real is None else real
            slots = meta.slot_mapping.long()
            write_rows = _cache_rows(slots // self.block_size, slots % self.block_size, self.spec.num_kv_heads,
                                     self.block_size).flatten()
            data = (write_rows, _build_groups(meta, self.block_size, self.spec, self.kernel_decodes),
                    None if real is None else real.slot_mapping.shape[0])
            metadata.backend_data[self._key] = data
        return data

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        write_rows, groups, num_real = self._step_data(metadata)
        if num_real is None:
            return self._forward(query, key, value, kv_cache, write_rows, groups)
        # Padding tokens trail the real ones (slot -1): they are dropped before the cache is written.
        out = query.new_zeros(query.shape)
        out[:num_real] = self._forward(query[:num_real], key[:num_real], value[:num_real], kv_cache, write_rows,
                                       groups)
        return out

    def _forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 write_rows: torch.Tensor, groups: list[_Group]) -> torch.Tensor:
        rows = kv_cache.view(2, -1, kv_cache.shape[-1])
        rows[0].index_copy_(0, write_rows, self._stored_rows(key))
        rows[1].index_copy_(0, write_rows, self._stored_rows(value))

        if len(groups) == 1 and groups[0].token_index is None:
            return self._attend(groups[0], query, kv_cache)
        out = torch.empty_like(query)
        for group in groups:
            out[group.token_index] = self._attend(group, query[group.token_index], kv_cache)
        return out

    def _stored_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The (tokens * kv_heads, row) cache rows of this step's keys or values, as the cache stores them."""
        x = x.reshape(-1, self.spec.head_dim)
        if self.format is None:
            return x.to(self.storage_dtype)
        codes, scale = quantize_rows(x, self.format)
        return torch.cat([codes.view(torch.uint8), scale.unsqueeze(-1).view(torch.uint8)], dim=-1)

    def _loaded(self, gathered: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gathered cache rows as values of `dtype`."""
        if self.format is None:
            return gathered.to(dtype)
        head_dim = self.spec.head_dim
        codes = gathered[..., :head_dim].view(self.format.code_dtype)
        scale = gathered[..., head_dim:].contiguous().view(torch.bfloat16).squeeze(-1)
        return dequantize_rows(codes, scale, dtype)

    def _attend(self, group: _Group, query: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """Attention of the group's (tokens, heads, head_dim) queries; same shape out."""
        spec = self.spec
        num_seqs, max_q = group.num_seqs, group.max_query_len
        if group.kv_rows is None:  # the decode kernel, one row per query token
            return paged_decode_attention(query, kv_cache[0], kv_cache[1], group.block_tables, group.seq_lens,
                                          group.total_positions, self.block_size, spec.sliding_window, spec.scale,
                                          self.cache_code)
        rows = kv_cache.view(2, -1, kv_cache.shape[-1])
        keys = self._loaded(rows[0][group.kv_rows], query.dtype)  # (B, kv_heads, max_seq_len, D)
        values = self._loaded(rows[1][group.kv_rows], query.dtype)
        if group.token_to_padded is None:  # one query token per sequence: no padding needed
            padded = query.unsqueeze(2)  # (B, H, 1, D)
        else:
            padded = query.new_zeros(num_seqs * max_q, spec.num_heads, spec.head_dim)
            padded[group.token_to_padded] = query
            padded = padded.view(num_seqs, max_q, spec.num_heads, spec.head_dim).transpose(1, 2)

        if spec.logit_softcap is None and max_q == 1:
            return _decode_attention(query, keys, values, group.mask, spec)
        if spec.logit_softcap is None:
            causal = group.mask is CAUSAL
            out = F.scaled_dot_product_attention(
                padded, keys, values, attn_mask=None if causal else group.mask, is_causal=causal,
                scale=spec.scale, enable_gqa=spec.num_heads != spec.num_kv_heads,
            )
        else:
            out = _softcapped_attention(padded, keys, values, group.mask, spec)
        if group.token_to_padded is None:
            return out.squeeze(2)
        out = out.transpose(1, 2).reshape(num_seqs * max_q, spec.num_heads, spec.head_dim)
        return out[group.token_to_padded]


def _decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, spec: AttentionSpec
) -> torch.Tensor:
    """One query token per sequence: two batched matmuls, query heads grouped under their kv head.

    PyTorch's CPU SDPA (flash kernel) is tuned for long queries; for one query row it runs 6 to 12 times
    slower than these matmuls (measured at 16 sequences of 100 and 1,200 tokens).
    """
    num_seqs = query.shape[0]
    group = spec.num_heads // spec.num_kv_heads
    grouped = query.view(num_seqs, spec.num_kv_heads, group, spec.head_dim)  # (B, K, G, D)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * spec.scale  # (B, K, G, L)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))  # (B, 1, 1, L) broadcasts over K and G
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).view(num_seqs, spec.num_heads, spec.head_dim)


def _softcapped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, spec: AttentionSpec
) -> torch.Tensor:
    """Attention with Gemma 2's tanh soft cap on the scores, which SDPA cannot express."""
    group = spec.num_heads // spec.num_kv_heads
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = (query @ keys.transpose(-1, -2)) * spec.scale
    scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values
