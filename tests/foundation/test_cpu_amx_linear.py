"""Dense bf16 linears on AMX tiles (csrc/amx_gemm.h) compute what the AVX512-BF16 kernel computes.

Both sum each output's products in float32, input pair by input pair, and round once; the two instructions
order a pair's two products differently, so an output may differ in its last bf16 bits, rarely.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tokenmill.interfaces import GGMLWeight
from tokenmill.plugins.cpu import _bf16_gemm
from tokenmill.plugins.cpu.quant import GGML_MAX_ROWS, PackedBF16Linear, bf16_gemm_available

pytestmark = pytest.mark.skipif(not bf16_gemm_available() or not _bf16_gemm.amx(),
                                reason="needs a CPU with AMX and a build for it")

# (out, in): SmolLM2's qkv and down shapes, and out not a multiple of the 16-output panel.
SHAPES = [(960, 576), (576, 1536), (50, 64)]
ROWS = [1, 3, 16, 17, 32, 45, 64]


@pytest.fixture
def both_kernels():
    """A function running a linear on AMX tiles or on AVX512-BF16; AMX again afterwards."""
    method = PackedBF16Linear()

    def run(x: torch.Tensor, prepared, amx: bool) -> torch.Tensor:
        _bf16_gemm.set_amx(amx)
        return method.matmul(x, prepared)

    yield method, run
    _bf16_gemm.set_amx(True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_tiles_agree_with_avx512_bf16_and_with_float32(both_kernels, shape) -> None:
    method, run = both_kernels
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator).to(torch.bfloat16)
    prepared = method.prepare(weight)
    for rows in ROWS:
        x = torch.randn(rows, shape[1], generator=generator).to(torch.bfloat16)
        amx, avx512 = run(x, prepared, True), run(x, prepared, False)
        reference = x.float() @ weight.float().T
        # One bf16 rounding of the float32 sum, give or take the sum's own float32 error.
        torch.testing.assert_close(amx.float(), reference, rtol=2 ** -8, atol=1e-3 * reference.abs().max().item())
        assert (amx != avx512).float().mean() < 0.01, f"{rows} rows"


def test_a_row_gets_the_same_result_alone_and_in_a_batch(both_kernels) -> None:
    method, run = both_kernels
    generator = torch.Generator().manual_seed(1)
    prepared = method.prepare(torch.randn(960, 576, generator=generator).to(torch.bfloat16))
    x = torch.randn(45, 576, generator=generator).to(torch.bfloat16)  # a chunk of 32 rows and a padded tail
    batched = run(x, prepared, True)
    alone = torch.cat([run(x[i:i + 1], prepared, True) for i in range(45)])
    assert torch.equal(alone, batched)


def test_inputs_not_a_multiple_of_32_take_avx512_bf16(both_kernels) -> None:
    method, run = both_kernels
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 48, generator=generator).to(torch.bfloat16)
    prepared = method.prepare(weight)
    x = torch.randn(20, 48, generator=generator).to(torch.bfloat16)
    assert torch.equal(run(x, prepared, True), run(x, prepared, False))


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0"])
def test_gguf_blocks_on_the_tiles_compute_what_their_dense_copy_does(both_kernels, ggml_type) -> None:
    # Many rows of a GGUF weight run its blocks dequantized onto the tiles, no dense copy kept: the same
    # bf16 weights, summed in the same order, so bit for bit the dense copy's results.
    method, run = both_kernels
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(72, 96, generator=generator) * 0.05
    blocks = quantize(weight.numpy(), GGMLQuantizationType[ggml_type])
    dequantized = torch.from_numpy(dequantize(blocks, GGMLQuantizationType[ggml_type]).copy())
    prepared = method.prepare_ggml(dequantized, GGMLWeight(ggml_type, torch.from_numpy(blocks.copy()), 96))
    assert prepared.dense is None
    dense = method.prepare(dequantized)
    # 64 rows: one pass over the blocks; fewer or more: each work item's two panels (the last one alone, a
    # partial panel) dequantized once and run as dense panels, 32 rows a pass, then a padded tail.
    for rows in (GGML_MAX_ROWS, 17, 60, 64, 70, 200):
        x = torch.randn(rows, 96, generator=generator).to(torch.bfloat16)
        assert torch.equal(run(x, prepared, True), run(x, dense, True)), f"{rows} rows"


@pytest.mark.parametrize("shape,rows", [((576, 1536), 600), ((960, 576), 1400)], ids=str)
def test_many_rows_run_in_blocks_of_rows_and_equal_the_rows_in_small_batches(both_kernels, shape, rows) -> None:
    """Past 768 KB of x (256 rows of 1,536 inputs, 672 of 576) the rows go in blocks, every work item over
    each block: several blocks and a padded tail here, each row as it is in a batch of 32."""
    method, run = both_kernels
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(shape, generator=generator).to(torch.bfloat16)
    prepared = method.prepare(weight)
    x = torch.randn(rows, shape[1], generator=generator).to(torch.bfloat16)
    batched = run(x, prepared, True)
    assert torch.equal(batched, torch.cat([run(x[i:i + 32], prepared, True) for i in range(0, rows, 32)]))
    reference = x.float() @ weight.float().T
    torch.testing.assert_close(batched.float(), reference, rtol=2 ** -8, atol=1e-3 * reference.abs().max().item())


def test_gguf_blocks_over_many_rows_in_blocks_of_rows_compute_what_their_dense_copy_does(both_kernels) -> None:
    method, run = both_kernels
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(72, 1536, generator=generator) * 0.05
    blocks = quantize(weight.numpy(), GGMLQuantizationType.Q4_1)
    dequantized = torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_1).copy())
    prepared = method.prepare_ggml(dequantized, GGMLWeight("Q4_1", torch.from_numpy(blocks.copy()), 1536))
    x = torch.randn(600, 1536, generator=generator).to(torch.bfloat16)
    assert torch.equal(run(x, prepared, True), run(x, method.prepare(dequantized), True))
