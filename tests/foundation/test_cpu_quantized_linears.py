"""The CPU backend's kernel for pre-quantized checkpoint weights (csrc/grouped_kernels.h): every kind of code,
group size, offsets or none, act-order and lookup, at least as exact as F.linear on the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from tokenmill.interfaces import QuantizedWeight
from tokenmill.plugins.cpu.quant import (
    OneDNNPackedLinear,
    PackedBF16Linear,
    PackedGroupedWeight,
    block_kernels_available,
    onednn_linear_available,
)

pytestmark = pytest.mark.skipif(not block_kernels_available(), reason="the block kernels need AVX512-BF16")

OUT, IN = 50, 256  # 50 outputs: a partial panel of 16
# GGUF's IQ4_NL values: int8, exact in bf16.
IQ4_VALUES = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def _fp8_codes(code_type: str, generator: torch.Generator) -> torch.Tensor:
    """Random fp8 bit patterns, no NaN or infinity, every subnormal and both signs among them."""
    bits = torch.arange(256, dtype=torch.uint8)
    finite = torch.isfinite(bits.view({"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[code_type])
                            .float())
    valid = bits[finite]
    codes = valid[torch.randint(len(valid), (OUT, IN), generator=generator)]
    codes[0, :len(valid)] = valid  # every pattern at least once: subnormals, negative zero, the largest
    return codes


def _weight(code_type: str, group_size: int, offsets: bool, generator: torch.Generator, lookup=None,
            ordered=False, fp16=False, zero=None) -> QuantizedWeight:
    groups = IN // group_size
    if code_type.startswith("fp8"):
        codes = _fp8_codes(code_type, generator)
    else:
        codes = torch.randint(1 << int(code_type.removeprefix("uint")), (OUT, IN), generator=generator,
                              dtype=torch.uint8)
    scales = torch.rand(OUT, groups, generator=generator) * 0.02 + 0.001
    zeros = torch.randn(OUT, groups, generator=generator) * 0.05 if offsets else None
    if fp16:  # GGUF's legacy blocks and symmetric GPTQ: every scale and offset exact in fp16
        scales, zeros = scales.half().float(), None if zeros is None else zeros.half().float()
    if zero is not None:  # symmetric: GGUF's Q4_0, Q5_0, Q6_K, symmetric GPTQ
        zeros = -zero * scales
    order = torch.randperm(IN, generator=generator) if ordered else None
    table = None if lookup is None else torch.tensor(lookup, dtype=torch.float32)
    return QuantizedWeight("gptq", code_type, codes, scales, zeros, group_size, order, table)


CASES = {
    "uint4 g16 offsets": ("uint4", 16, True, {}),
    "uint4 g32": ("uint4", 32, False, {}),
    "uint4 g64 offsets": ("uint4", 64, True, {}),
    "uint4 g128 offsets act-order": ("uint4", 128, True, {"ordered": True}),
    "uint4 per-channel": ("uint4", IN, True, {}),
    "uint4 g32 fp16 offsets (Q4_1)": ("uint4", 32, True, {"fp16": True}),
    "uint4 g16 fp16": ("uint4", 16, False, {"fp16": True}),
    "uint5 g32 fp16 offsets (Q5_1)": ("uint5", 32, True, {"fp16": True}),
    "uint8 g32 fp16 offsets (Q8_0)": ("uint8", 32, True, {"fp16": True}),
    "iq4 lookup g32 fp16": ("uint4", 32, False, {"lookup": IQ4_VALUES, "fp16": True}),
    "uint2 g16 offsets": ("uint2", 16, True, {}),
    "uint3 g16 offsets": ("uint3", 16, True, {}),
    "iq4 lookup g32": ("uint4", 32, False, {"lookup": IQ4_VALUES}),
    "iq4 lookup g32 offsets": ("uint4", 32, True, {"lookup": IQ4_VALUES}),
    "uint5 g32 offsets": ("uint5", 32, True, {}),
    "uint5 g16 offsets": ("uint5", 16, True, {}),
    "uint5 g64": ("uint5", 64, False, {}),
    "uint5 g32 fp16 symmetric (Q5_0)": ("uint5", 32, True, {"fp16": True, "zero": 16}),
    "uint4 g32 fp16 symmetric (Q4_0)": ("uint4", 32, True, {"fp16": True, "zero": 8}),
    "uint6 g16 symmetric (Q6_K)": ("uint6", 16, True, {"zero": 32}),
    "uint6 g16 offsets": ("uint6", 16, True, {}),
    "uint6 g128 act-order": ("uint6", 128, False, {"ordered": True}),
    "uint7 g32 offsets": ("uint7", 32, True, {}),
    "uint8 g32 symmetric": ("uint8", 32, True, {"zero": 128}),
    "uint8 g128 offsets act-order": ("uint8", 128, True, {"ordered": True}),
    "uint8 per-channel": ("uint8", IN, False, {}),
    "fp8_e4m3 per-channel": ("fp8_e4m3", IN, False, {}),
    "fp8_e4m3 g128": ("fp8_e4m3", 128, False, {}),
    "fp8_e5m2 per-channel": ("fp8_e5m2", IN, False, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_kernel_is_at_least_as_exact_as_f_linear_on_the_dequantized_weight(case) -> None:
    code_type, group_size, offsets, extra = CASES[case]
    generator = torch.Generator().manual_seed(len(case))
    weight = _weight(code_type, group_size, offsets, generator, **extra)
    method = PackedBF16Linear()
    prepared = method.prepare_quantized(weight)
    assert isinstance(prepared, PackedGroupedWeight)
    reference = weight.dequantize()
    # The weight the kernel computes with is the checkpoint's, up to offsets moved in float32 (by 128 scales
    # at most: an ulp of ~2.6 is 2.4e-7), far below a bf16 rounding of these weights (~4e-4).
    torch.testing.assert_close(method.dequantize(prepared), reference, rtol=0, atol=1e-6)
    # Every tail of the 8-row tiles, 4 panels a work item to 2 rows and 2 from 3, the group-wise kernel
    # below 32 rows and dequantized panels from there.
    for rows in [*range(1, 10), 15, 16, 17, 31, 32, 40]:
        x = torch.randn(rows, IN, generator=generator).to(torch.bfloat16)
        expected = x.double() @ reference.double().T
        got = method.matmul(x, prepared)
        dense = F.linear(x, reference.to(torch.bfloat16))
        assert got.dtype == torch.bfloat16 and got.shape == (rows, OUT)
        assert (got.double() - expected).norm() <= 1.1 * (dense.double() - expected).norm() + 1e-6, rows


@pytest.mark.parametrize("code_type,mantissa_bits", [("fp8_e4m3", 3), ("fp8_e5m2", 2)])
def test_fp8_subnormal_weights_are_not_flushed(code_type, mantissa_bits) -> None:
    # Only subnormals (exponent 0), both signs: vdpbf16ps flushes bf16 denormals, so a kernel that shifted
    # the fp8 bits into a bf16 without rebiasing them would read every one of these as zero.
    generator = torch.Generator().manual_seed(3)
    mantissas = torch.randint(1, 1 << mantissa_bits, (OUT, IN), generator=generator, dtype=torch.uint8)
    codes = mantissas | (torch.randint(2, (OUT, IN), generator=generator, dtype=torch.uint8) << 7)
    weight = QuantizedWeight("fp8", code_type, codes, torch.ones(OUT, 1), None, IN)
    method = PackedBF16Linear()
    x = torch.randn(4, IN, generator=generator).to(torch.bfloat16)
    expected = x.double() @ weight.dequantize().double().T
    got = method.matmul(x, method.prepare_quantized(weight)).double()
    assert (got - expected).norm() <= 2**-8 * expected.norm()


def test_scales_exact_in_fp16_are_stored_in_fp16() -> None:
    # A quarter fewer bytes at 4 bits and groups of 32: as small as the GGUF's Q4_1 blocks.
    exact = _weight("uint4", 32, True, torch.Generator().manual_seed(4), fp16=True)
    rounded = _weight("uint4", 32, True, torch.Generator().manual_seed(4))
    method = PackedBF16Linear()
    padded_out = -(-OUT // 16) * 16
    assert method.prepare_quantized(exact).packed.numel() < 0.63 * padded_out * IN + 512
    assert method.prepare_quantized(rounded).packed.numel() >= 0.75 * padded_out * IN


@pytest.mark.parametrize("code_type,group_size,zero,bytes_per_weight", [
    ("uint5", 32, 16, 0.6875),  # GGUF's Q5_0 size: 4-bit codes, one bit plane, an fp16 scale a group
    ("uint6", 16, 32, 1.0),  # Q6_K's codes at 0.75, a float32 scale per 16
])
def test_symmetric_weights_keep_no_offsets_and_high_bits_take_planes(code_type, group_size, zero,
                                                                      bytes_per_weight) -> None:
    weight = _weight(code_type, group_size, True, torch.Generator().manual_seed(6), fp16=group_size == 32, zero=zero)
    prepared = PackedBF16Linear().prepare_quantized(weight)
    padded_out = -(-OUT // 16) * 16
    assert prepared.packed.numel() == 320 + bytes_per_weight * padded_out * IN
    shifted = QuantizedWeight("gptq", code_type, weight.codes, weight.scales, weight.offsets + weight.scales / 2,
                              group_size)  # not -z scale: the offsets are kept
    assert PackedBF16Linear().prepare_quantized(shifted).packed.numel() > prepared.packed.numel()


def test_a_row_gets_the_same_result_alone_and_in_a_batch() -> None:
    # Below the dequantized-panel path (32 rows), each row's arithmetic does not depend on the rows beside it.
    weight = _weight("uint4", 32, True, torch.Generator().manual_seed(0))
    method = PackedBF16Linear()
    prepared = method.prepare_quantized(weight)
    x = torch.randn(31, IN).to(torch.bfloat16)
    batched = method.matmul(x, prepared)
    assert torch.equal(torch.cat([method.matmul(x[i:i + 1], prepared) for i in range(31)]), batched)
    assert method.matmul(x[:0], prepared).shape == (0, OUT)


def test_weights_the_kernel_cannot_read_take_the_dense_path() -> None:
    # Inputs not a multiple of 16: the dequantized weight in bf16, as F.linear would use it.
    generator = torch.Generator().manual_seed(1)
    weight = QuantizedWeight("awq", "uint4", torch.randint(16, (OUT, 40), generator=generator, dtype=torch.uint8),
                             torch.rand(OUT, 5, generator=generator), None, 8)
    method = PackedBF16Linear()
    prepared = method.prepare_quantized(weight)
    assert not isinstance(prepared, PackedGroupedWeight)
    x = torch.randn(3, 40).to(torch.bfloat16)
    torch.testing.assert_close(method.matmul(x, prepared), F.linear(x, weight.dequantize(torch.bfloat16)))


@pytest.mark.skipif(not onednn_linear_available(), reason="needs oneDNN")
def test_onednn_runs_the_dequantized_weight() -> None:
    weight = _weight("uint4", 32, True, torch.Generator().manual_seed(2))
    method = OneDNNPackedLinear()
    x = torch.randn(5, IN).to(torch.bfloat16)
    torch.testing.assert_close(method.matmul(x, method.prepare_quantized(weight)),
                               F.linear(x, weight.dequantize(torch.bfloat16)))
