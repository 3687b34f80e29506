"""Every GGUF block type tokenmill runs from its blocks becomes a `QuantizedWeight` that dequantizes to
gguf-py's own dequantization bit for bit, whole or cut into a rank's rows and blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from tokenmill.interfaces import GGMLWeight
from tokenmill.loader.ggml_blocks import GGML_BLOCK_TYPES, quantized_from_ggml, stack_rows

# Byte offsets of each block's fp16 scales (ggml-common.h): random bytes there would be infs and NaNs.
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5,
        "Q6_K": 6, "IQ4_NL": 4, "IQ4_XS": 4}


def random_blocks(ggml_type: str, rows: int, blocks_per_row: int, seed: int = 0,
                  exponents: tuple[float, float] = (-8, 2), scale: float = 1.0) -> np.ndarray:
    """(rows, bytes per row) of random blocks: every code and sub-scale bit pattern, finite fp16 scales of
    either sign, `scale` times 10 ** (`exponents` range: by default from subnormal to large), and zeros."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    raw = rng.integers(0, 256, (rows, blocks_per_row, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[ggml_type]:
        scales = rng.standard_normal((rows, blocks_per_row, 1)) * 10.0 ** rng.uniform(*exponents, (rows, blocks_per_row, 1))
        scales[0, 0] = 0.0
        scales *= scale
        raw[..., offset:offset + 2] = scales.astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _bits(values: np.ndarray) -> np.ndarray:
    # + 0.0 turns -0.0 into +0.0: ggml's d * 0 keeps d's sign, d * 8 - 8 * d is +0 (the same number).
    return (np.asarray(values, dtype=np.float32) + np.float32(0)).view(np.int32)


def test_every_type_the_issue_names_has_a_normal_form() -> None:
    assert GGML_BLOCK_TYPES == set(FP16_FIELDS)


@pytest.mark.parametrize("ggml_type", sorted(FP16_FIELDS))
def test_blocks_dequantize_as_gguf_py_does_whole_and_sharded(ggml_type: str) -> None:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    rows, blocks_per_row = 6, 4
    raw = random_blocks(ggml_type, rows, blocks_per_row)
    expected = dequantize(raw, GGMLQuantizationType[ggml_type]).reshape(rows, -1)
    weight = quantized_from_ggml(GGMLWeight(ggml_type, torch.from_numpy(raw), blocks_per_row * block_size))
    assert weight.format == "gguf" and weight.bits == BITS[ggml_type]
    assert weight.codes.dtype == torch.uint8 and int(weight.codes.max()) < 2 ** weight.bits
    assert weight.scales.dtype == torch.float32 and weight.group_size in (16, 32)
    np.testing.assert_array_equal(_bits(weight.dequantize()), _bits(expected))
    # A column-parallel rank's rows, then a row-parallel rank's blocks (Linear._local_ggml's cuts).
    rows_part = GGMLWeight(ggml_type, torch.from_numpy(raw[2:4]), blocks_per_row * block_size)
    np.testing.assert_array_equal(_bits(quantized_from_ggml(rows_part).dequantize()), _bits(expected[2:4]))
    half = blocks_per_row // 2 * type_size
    inputs_part = GGMLWeight(ggml_type, torch.from_numpy(raw[:, half:].copy()), blocks_per_row // 2 * block_size)
    np.testing.assert_array_equal(_bits(quantized_from_ggml(inputs_part).dequantize()),
                                  _bits(expected[:, blocks_per_row // 2 * block_size:]))


def test_a_type_without_a_normal_form_is_named_in_the_error() -> None:
    blocks = torch.zeros(1, 66, dtype=torch.uint8)  # one IQ2_XXS block
    with pytest.raises(ValueError, match="IQ2_XXS has no QuantizedWeight form; types with one: IQ4_NL"):
        quantized_from_ggml(GGMLWeight("IQ2_XXS", blocks, 256))


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q5_0", "Q8_0", "Q2_K"), ("IQ4_NL", "IQ4_XS"),
                                   ("IQ4_NL", "Q5_0", "IQ4_XS", "Q3_K")])
def test_fused_parts_of_mixed_types_stack_without_changing_a_value(types) -> None:
    """Q4_K_M keeps q and k in Q4_K and v in Q6_K: the fused q/k/v is still one weight of exact values."""
    parts = []
    for seed, ggml_type in enumerate(types):
        block_size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]][0]
        raw = random_blocks(ggml_type, 3 + seed, 256 // block_size, seed)
        parts.append((raw, ggml_type))
    stacked = stack_rows([quantized_from_ggml(GGMLWeight(t, torch.from_numpy(raw), 256)) for raw, t in parts])
    expected = np.concatenate([dequantize(raw, GGMLQuantizationType[t]).reshape(len(raw), -1) for raw, t in parts])
    np.testing.assert_array_equal(_bits(stacked.dequantize()), _bits(expected))
    assert stacked.group_size == min(16 if t in ("Q2_K", "Q3_K", "Q6_K") else 32 for t in types)


def test_stack_rows_keeps_a_shared_code_type_and_act_order_and_refuses_what_cannot_be_one_weight() -> None:
    from tokenmill.interfaces import QuantizedWeight
    from tokenmill.loader.ggml_blocks import stack_rows

    def weight(code_type: str, order=None) -> QuantizedWeight:
        return QuantizedWeight("gptq", code_type, torch.randint(0, 16, (4, 64), dtype=torch.uint8),
                               torch.rand(4, 2), None, 32, order)

    order = torch.randperm(64)
    stacked = stack_rows([weight("fp8_e4m3"), weight("fp8_e4m3")])
    assert stacked.code_type == "fp8_e4m3" and stacked.codes.shape == (8, 64)
    parts = [weight("uint4", order), weight("uint4", order)]
    stacked = stack_rows(parts)
    assert torch.equal(stacked.input_order, order)
    assert torch.equal(stacked.dequantize(), torch.cat([part.dequantize() for part in parts]))
    assert stack_rows([weight("uint4", order), weight("uint4", torch.randperm(64))]) is None
    assert stack_rows([weight("uint4", order), weight("uint4")]) is None
    assert stack_rows([weight("fp8_e4m3"), weight("uint8")]) is None
