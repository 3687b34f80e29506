"""The CPU backend's compiled kernels (plugins/cpu/csrc), built by setup.py when tokenmill is installed.

When the extension is missing (a build without a C compiler), `decode_attention_kernel()` is None and
attention falls back to batched matmuls in PyTorch: slower, same results.
"""

from __future__ import annotations

import torch

try:
    from tokenmill.plugins.cpu import _paged_attention
except ImportError:  # pragma: no cover - depends on the build
    _paged_attention = None

_DTYPE_CODES = {torch.bfloat16: 0, torch.float32: 1}
# What attention_kernels.h calls each KV-cache storage: a torch dtype, or a one-byte format's name.
CACHE_CODES = {torch.bfloat16: 0, torch.float32: 1, "int8": 2, "fp8_e4m3": 3, "fp8_e5m2": 4}


def decode_attention_kernel_available(dtype: torch.dtype) -> bool:
    return _paged_attention is not None and dtype in _DTYPE_CODES


def paged_decode_attention(
    query: torch.Tensor,  # (num_seqs, num_heads, head_dim), contiguous
    key_cache: torch.Tensor,  # (num_blocks, num_kv_heads, block_size, head_dim), contiguous
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (num_seqs, max_blocks) int32, contiguous rows
    seq_lens: torch.Tensor,  # (num_seqs,) int32
    total_positions: int,  # seq_lens.sum(), known on the host already
    block_size: int,
    sliding_window: int | None,
    scale: float,
    cache_code: int | None = None,  # CACHE_CODES of what the cache stores; None: the query's dtype
) -> torch.Tensor:
    """Attention of one query token per sequence over its cached context, read from the blocks in place."""
    query = query.contiguous()
    out = torch.empty_like(query)
    _paged_attention.decode_attention(
        query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), block_tables.data_ptr(),
        seq_lens.data_ptr(), out.data_ptr(), block_tables.stride(0), query.shape[0], query.shape[1],
        key_cache.shape[1], query.shape[2], block_size, sliding_window or 0, _DTYPE_CODES[query.dtype], scale,
        total_positions, torch.get_num_threads(), CACHE_CODES[query.dtype] if cache_code is None else cache_code,
    )
    return out
