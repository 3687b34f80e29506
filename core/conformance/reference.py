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
class PagedBatch:
    """A random ragged batch whose earlier context already sits in scattered cache blocks."""

    metadata: AttentionMetadata
    query: torch.Tensor
    new_keys: torch.Tensor
    new_values: torch.Tensor
    full_keys: list[torch.Tensor]  # per sequence, cached context followed by the new tokens
    full_values: list[torch.Tensor]
    query_lens: list[int]


def build_paged_batch(
    layout: KVCacheLayout,
    kv_cache: torch.Tensor,
    spec: AttentionSpec,
    seqs: list[tuple[int, int]],
    generator: torch.Generator,
    device: torch.device,
) -> PagedBatch:
    """Fill `kv_cache` with random cached context for each ``(num_cached, num_new)`` in `seqs`.

    Blocks are handed out in a shuffled order so no kernel can rely on contiguous blocks. The cached
    part is written through the layout's own memory (keys at index 0, values at 1 along dim 0 of the
    per-slot view), matching how `AttentionBackend.forward` writes new tokens.
    """
    block_size = layout.block_size
    num_blocks = kv_cache.shape[1]
    blocks_needed = [math.ceil((cached + new) / block_size) for cached, new in seqs]
    if sum(blocks_needed) > num_blocks:
        raise ValueError("the cache is too small for this batch")
    order = torch.randperm(num_blocks, generator=generator).tolist()
    max_blocks = max(blocks_needed)
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    flat = kv_cache.view(2, -1, spec.num_kv_heads, spec.head_dim)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(spec.dtype)

    slots, full_keys, full_values, query_lens = [], [], [], []
    new_keys, new_values = [], []
    for i, ((cached, new), n_blocks) in enumerate(zip(seqs, blocks_needed)):
        table = [order.pop() for _ in range(n_blocks)]
        block_tables[i, :n_blocks] = torch.tensor(table, dtype=torch.int32)
        seq_slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(cached + new)])
        k = randn(cached + new, spec.num_kv_heads, spec.head_dim)
        v = randn(cached + new, spec.num_kv_heads, spec.head_dim)
        flat[0][seq_slots[:cached].to(device)] = k[:cached].to(device, kv_cache.dtype)
        flat[1][seq_slots[:cached].to(device)] = v[:cached].to(device, kv_cache.dtype)
        slots.append(seq_slots[cached:])
        full_keys.append(k)
        full_values.append(v)
        new_keys.append(k[cached:])
        new_values.append(v[cached:])
        query_lens.append(new)

    lens = torch.tensor(query_lens, dtype=torch.int32)
    metadata = AttentionMetadata(
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()]).to(device),
        seq_lens=torch.tensor([c + n for c, n in seqs], dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.cat(slots).long().to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(c + n for c, n in seqs),
    )
    query = randn(sum(query_lens), spec.num_heads, spec.head_dim)
    return PagedBatch(
        metadata=metadata,
        query=query.to(device),
        new_keys=torch.cat(new_keys).to(device),
        new_values=torch.cat(new_values).to(device),
        full_keys=full_keys,
        full_values=full_values,
        query_lens=query_lens,
    )
