"""Paged attention through the Triton kernels, for the cuda, rocm and xpu backends.

The cache layout is the CPU plugin's, ``(2, num_blocks, num_kv_heads, block_size, head_dim)`` per layer:
a kv head's rows of a block are one contiguous (block_size, head_dim) tile, which is what the kernels
load per iteration. The kernels read the step's metadata tensors as they are, so `prepare` has nothing
to do, and a step with one query token per sequence runs the decode kernel, whose grid depends on the
number of sequences alone (what a captured CUDA graph needs).
"""

from __future__ import annotations

from typing import Sequence

import torch

from tokenmill.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec, KVCacheLayout, KVCacheShape
from tokenmill.plugins.triton import ops

DEFAULT_BLOCK_SIZE = 16


class TritonKVCacheLayout(KVCacheLayout):
    """Blocks as ``(2, num_blocks, num_kv_heads, block_size, head_dim)`` per layer, keys then values."""

    cache_dtypes = ("auto",)  # the Triton kernels read keys and values in the model's dtype only

    def __init__(self, shape: KVCacheShape, device: torch.device, block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size < 16 or block_size & (block_size - 1):
            # A key block is a tl.arange extent and a tl.dot operand.
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.shape = shape
        self.device = device
        self.block_size = block_size

    def bytes_per_block(self) -> int:
        s = self.shape
        return 2 * s.num_layers * self.block_size * s.num_kv_heads * s.head_dim * s.dtype.itemsize

    def allocate(self, num_blocks: int) -> list[torch.Tensor]:
        s = self.shape
        size = (2, num_blocks, s.num_kv_heads, self.block_size, s.head_dim)
        return [torch.zeros(size, dtype=s.dtype, device=self.device) for _ in range(s.num_layers)]

    def copy_blocks(self, caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in caches:
            src_blocks, dst_blocks = src.to(cache.device), dst.to(cache.device)
            cache.index_copy_(1, dst_blocks, cache.index_select(1, src_blocks))


class TritonPagedAttention(AttentionBackend):
    """Prefill, chunked prefill and decode for the layers of one `AttentionSpec`, one kernel call each."""

    def __init__(self, spec: AttentionSpec, layout: KVCacheLayout):
        self.spec = spec
        self.block_size = layout.block_size  # what a graph runner sizes its static block tables by

    def prepare(self, metadata: AttentionMetadata) -> None:
        pass  # the kernels read the metadata tensors as they are: nothing per step to build or keep

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        spec = self.spec
        ops.write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        if metadata.max_query_len == 1:
            return ops.paged_decode_attention(query, kv_cache, metadata.block_tables, metadata.seq_lens, spec.scale,
                                              spec.sliding_window, spec.logit_softcap)
        return ops.ragged_paged_attention(query, kv_cache, metadata.block_tables, metadata.seq_lens,
                                          metadata.query_start_loc, metadata.max_query_len, spec.scale,
                                          spec.sliding_window, spec.logit_softcap)
