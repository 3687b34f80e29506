"""The CPU backend's compiled decode-attention kernel: built by the install, and equal to the PyTorch path."""

import pytest
import torch

from tokenmill.interfaces import AttentionSpec
from tokenmill.plugins.cpu import kernels
from tokenmill.plugins.cpu.attention import _decode_attention


def test_the_install_built_the_kernel() -> None:
    assert kernels._paged_attention is not None, "plugins/cpu/csrc was not compiled; reinstall with a C compiler"


def test_the_kernel_shares_pytorchs_openmp_runtime() -> None:
    """A second OpenMP runtime would keep its own threads spinning against PyTorch's for the two cores."""
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [(9, 3, 64, None), (16, 4, 128, 33), (4, 4, 32, 7), (8, 2, 40, None)])
def test_kernel_matches_batched_matmuls(dtype, heads, kv_heads, head_dim, window) -> None:
    torch.manual_seed(0)
    block_size, num_blocks, num_seqs = 16, 64, 5
    cache = torch.randn(2, num_blocks, kv_heads, block_size, head_dim).to(dtype)  # head-major blocks
    seq_lens = torch.tensor([1, 17, 40, 3, 100], dtype=torch.int32)
    block_tables = torch.randperm(num_blocks)[: num_seqs * 8].view(num_seqs, 8).to(torch.int32)
    query = torch.randn(num_seqs, heads, head_dim).to(dtype)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, dtype, sliding_window=window)

    out = kernels.paged_decode_attention(query, cache[0], cache[1], block_tables, seq_lens, int(seq_lens.sum()),
                                         block_size, window, spec.scale)

    positions = torch.arange(int(seq_lens.max()))
    blocks, offsets = block_tables.long()[:, positions // block_size], positions % block_size
    mask = positions[None, :] < seq_lens[:, None]
    if window:
        mask &= positions[None, :] >= (seq_lens[:, None] - window)
    keys, values = (c[blocks, :, offsets].transpose(1, 2) for c in cache)  # (seqs, kv_heads, positions, D)
    expected = _decode_attention(query, keys, values, mask[:, None, None, :], spec)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("cache_dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 40)])  # bf16 dot products; scalar path
def test_kernel_over_a_quantized_cache_matches_float32_over_its_dequantized_values(cache_dtype, heads, kv_heads,
                                                                                   head_dim) -> None:
    from tokenmill.kv_cache_dtype import QUANTIZED_FORMATS, dequantize_rows, quantize_rows

    torch.manual_seed(0)
    block_size, num_blocks, num_seqs = 16, 64, 5
    codes, scales = quantize_rows(torch.randn(2, num_blocks, kv_heads, block_size, head_dim),
                                  QUANTIZED_FORMATS[cache_dtype])
    cache = torch.cat([codes.view(torch.uint8), scales.unsqueeze(-1).view(torch.uint8)], dim=-1)
    dequantized = dequantize_rows(codes, scales, torch.float32)
    seq_lens = torch.tensor([1, 17, 40, 3, 100], dtype=torch.int32)
    block_tables = torch.randperm(num_blocks)[: num_seqs * 8].view(num_seqs, 8).to(torch.int32)
    query = torch.randn(num_seqs, heads, head_dim).bfloat16()
    args = (block_tables, seq_lens, int(seq_lens.sum()), block_size, None, head_dim**-0.5)

    expected = kernels.paged_decode_attention(query.float(), dequantized[0], dequantized[1], *args)
    out = kernels.paged_decode_attention(query, cache[0], cache[1], *args,
                                         cache_code=kernels.CACHE_CODES[cache_dtype])
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)  # bf16 queries and weights
