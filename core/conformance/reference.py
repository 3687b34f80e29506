"""Reference computations and batch builders the conformance cases share.

`reference_attention` is deliberately naive: a float64 loop over sequences, easy to trust. `PagedBatch`
builds a random ragged batch over scattered cache blocks, the way the engine would, so that a backend's
kernels are tested on layouts it will really see (lengths crossing block boundaries, shuffled blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenmill.interfaces import AttentionMetadata, AttentionSpec, KVCacheLayout


def reference_attention(
    query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
    keys: list[torch.Tensor],  # per sequence: (seq_len, num_kv_heads, head_dim), the whole context
    values: list[torch.Tensor],
    query_lens: list[int],
    spec: AttentionSpec,
) -> torch.Tensor:
    """Causal attention in float64, one sequence at a time; queries are each context's last tokens."""
    outputs = []
    start = 0
    group = spec.num_heads // spec.num_kv_heads
    for k, v, query_len in zip(keys, values, query_lens):
        q = query[start : start + query_len].double().transpose(0, 1)  # (H, q, D)
        k64 = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # (H, L, D)
        v64 = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
        seq_len = k.shape[0]
        scores = (q @ k64.transpose(-1, -2)) * spec.scale  # (H, q, L)
        if spec.logit_softcap is not None:
            scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
        query_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
        key_pos = torch.arange(seq_len)[None, :]
        allowed = key_pos <= query_pos
        if spec.sliding_window is not None:
            allowed &= key_pos > query_pos - spec.sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        outputs.append((torch.softmax(scores, dim=-1) @ v64).transpose(0, 1))
        start += query_len
    return torch.cat(outputs)


@dataclass
class PagedStep:
    """One attention call: its metadata and the new tokens' queries, keys and values."""

    metadata: AttentionMetadata
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


@dataclass
class PagedBatch:
    """A random ragged batch over scattered cache blocks, in two steps.

    `fill` writes each sequence's earlier context through the backend's own `forward` (so any cache
    layout works); `step` is the batch under test: each sequence's new tokens over that context.
    """

    fill: PagedStep | None  # None when no sequence has earlier context
    step: PagedStep
    full_keys: list[torch.Tensor]  # per sequence, the whole context: earlier tokens then new ones
    full_values: list[torch.Tensor]
    query_lens: list[int]  # new tokens per sequence in `step`
    # Per sequence with earlier context, what `fill` wrote: the context, then any rejected tokens.
    fill_keys: list[torch.Tensor]
    fill_values: list[torch.Tensor]


def _paged_step(
    tables: list[list[int]], spans: list[tuple[int, int]], keys: list[torch.Tensor], values: list[torch.Tensor],
    queries: list[torch.Tensor], block_size: int, device: torch.device,
) -> PagedStep:
    """Metadata for sequences whose tokens `start:end` (per `spans`) are this step's queries."""
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.zeros(len(tables), max_blocks, dtype=torch.int32)
    slots = []
    for i, (table, (start, end)) in enumerate(zip(tables, spans)):
        block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
    lens = torch.tensor([end - start for start, end in spans], dtype=torch.int32)
    metadata = AttentionMetadata(
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()]).to(device),
        seq_lens=torch.tensor([end for _, end in spans], dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=int(lens.max()),
        max_seq_len=max(end for _, end in spans),
    )
    return PagedStep(
        metadata,
        torch.cat([q[s:e] for q, (s, e) in zip(queries, spans)]).to(device),
        torch.cat([k[s:e] for k, (s, e) in zip(keys, spans)]).to(device),
        torch.cat([v[s:e] for v, (s, e) in zip(values, spans)]).to(device),
    )


def build_paged_batch(
    layout: KVCacheLayout,
    num_blocks: int,
    spec: AttentionSpec,
    seqs: list[tuple[int, int]],
    generator: torch.Generator,
    device: torch.device,
    rejected: int = 0,
) -> PagedBatch:
    """A batch of sequences, each ``(num_cached, num_new)`` tokens, over shuffled blocks.

    Blocks are handed out in a random order so no kernel can rely on contiguous blocks. With `rejected`,
    `fill` also writes that many tokens past each context, with other keys and values, as a step
    verifying draft tokens leaves the rejected ones: `step` must write over them and never see them.
    """
    block_size = layout.block_size
    blocks_needed = [math.ceil((cached + max(new, rejected if cached else 0)) / block_size) for cached, new in seqs]
    if sum(blocks_needed) > num_blocks:
        raise ValueError("the cache is too small for this batch")
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = [[order.pop() for _ in range(n)] for n in blocks_needed]

    def randn(length: int, heads: int) -> torch.Tensor:
        return torch.randn(length, heads, spec.head_dim, generator=generator).to(spec.dtype)

    keys = [randn(c + n, spec.num_kv_heads) for c, n in seqs]
    values = [randn(c + n, spec.num_kv_heads) for c, n in seqs]
    queries = [randn(c + n, spec.num_heads) for c, n in seqs]

    with_context = [i for i, (cached, _) in enumerate(seqs) if cached]
    fill = None
    fill_keys = [torch.cat([keys[i][: seqs[i][0]], randn(rejected, spec.num_kv_heads)]) for i in with_context]
    fill_values = [torch.cat([values[i][: seqs[i][0]], randn(rejected, spec.num_kv_heads)]) for i in with_context]
    if with_context:
        fill_queries = [randn(seqs[i][0] + rejected, spec.num_heads) for i in with_context]
        fill = _paged_step([tables[i] for i in with_context], [(0, seqs[i][0] + rejected) for i in with_context],
                           fill_keys, fill_values, fill_queries, block_size, device)
    step = _paged_step(tables, [(c, c + n) for c, n in seqs], keys, values, queries, block_size, device)
    return PagedBatch(fill, step, keys, values, [n for _, n in seqs], fill_keys, fill_values)
