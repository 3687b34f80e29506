"""The CPU kernels that run a GGUF's Q4_1 and Q8_0 blocks (csrc/gemm_kernels.h on AVX512-BF16, csrc/avx2_gemm.h
on AVX2 against int16 activations), called directly at every row count: each output within bf16 rounding of
the exact product with the dequantized weight, a row's result the same alone and in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tokenmill.plugins.cpu.quant import GGML_FORMATS, ggml_kernels_available, pack_ggml

pytestmark = pytest.mark.skipif(not ggml_kernels_available(), reason="the GGUF block kernels need AVX512-BF16 or AVX2")

OUT, IN = 50, 192  # a partial panel of 16 outputs, 6 blocks of 32 inputs


def _weight(ggml_type: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed blocks and their exact dequantized values (float64)."""
    generator = torch.Generator().manual_seed(seed)
    kind = GGMLQuantizationType[ggml_type]
    blocks = quantize((torch.randn(OUT, IN, generator=generator) * 0.05).numpy(), kind)
    exact = torch.from_numpy(dequantize(blocks, kind).reshape(OUT, IN)).double()
    return pack_ggml(GGML_FORMATS[ggml_type], torch.from_numpy(np.ascontiguousarray(blocks))), exact


def _linear(ggml_type: str, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from tokenmill.plugins.cpu import _bf16_gemm

    x = x.to(torch.bfloat16).contiguous()
    y = torch.empty(x.shape[0], OUT, dtype=torch.bfloat16)
    _bf16_gemm.linear(GGML_FORMATS[ggml_type].code, x.data_ptr(), packed.data_ptr(), y.data_ptr(), x.shape[0], OUT,
                      IN // 2, IN, OUT, 2)
    return y


def _assert_within_bf16_rounding(got: torch.Tensor, x: torch.Tensor, exact: torch.Tensor) -> None:
    x = x.to(torch.bfloat16).double()
    expected = x @ exact.T
    # One bf16 rounding of the result is 2^-9 of it; twice that leaves room for float32 sums, not for a wrong
    # term. Plus what AVX2's int16 codes may round: 2^-15 of each input's block's largest (2^-13 here).
    block_largest = x.abs().view(x.shape[0], -1, 32).amax(-1).repeat_interleave(32, -1)
    bound = expected.abs() * 2.0 ** -8 + 2.0 ** -13 * (block_largest @ exact.abs().T)
    assert ((got.double() - expected).abs() <= bound).all(), (got.double() - expected).abs().max()


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_blocks_give_the_exact_product_within_bf16_rounding(ggml_type, rows) -> None:
    packed, exact = _weight(ggml_type, rows)
    x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(10 + rows))
    _assert_within_bf16_rounding(_linear(ggml_type, packed, x), x, exact)


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0"])
def test_inputs_far_below_their_blocks_largest_still_count(ggml_type) -> None:
    # On AVX2 a block's int16 codes are exact down to 2^-7 of its largest input; below that they round, which
    # must not show at bf16's resolution. Inputs spanning 2^-20 to 2^10 in every block, and a block of zeros.
    packed, exact = _weight(ggml_type, 7)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, IN, generator=generator) * 2.0 ** torch.randint(-20, 10, (2, IN), generator=generator)
    x[0, :32] = 0
    _assert_within_bf16_rounding(_linear(ggml_type, packed, x), x, exact)


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0"])
def test_a_row_gets_the_same_result_alone_and_in_a_batch(ggml_type) -> None:
    packed, _ = _weight(ggml_type, 1)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(4))
    batched = _linear(ggml_type, packed, x)
    for row in range(5):
        assert torch.equal(_linear(ggml_type, packed, x[row:row + 1])[0], batched[row])
