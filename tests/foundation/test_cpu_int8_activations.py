"""The CPU backend's `--quantize int8-activations`: a GGUF's Q4_1 and Q8_0 blocks against activations
quantized to int8 per 32 inputs (csrc/gemm_kernels.h, AVX512-VNNI), with no dense copy kept."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from tests.engine.test_gguf_block_types import LINEARS, SIZES, _blocks_like
from tests.loader.test_gguf_families import OVERRIDES, write_gguf
from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.layers.linear import Linear
from tokenmill.plugins.cpu import _bf16_gemm
from tokenmill.plugins.cpu.decode_stack import CapturedForward
from tokenmill.plugins.cpu.quant import GGML_FORMATS, PackedGGMLWeight, int8_activations_available, pack_ggml
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not int8_activations_available(), reason="needs a build with AVX512-VNNI")


def _blocks(ggml_type: str, out_features: int, in_features: int, seed: int):
    """Random weights as `ggml_type` blocks, and their d, m (Q4_1; else None) and q per (output, block)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    blocks = quants.quantize(weight.numpy(), GGMLQuantizationType[ggml_type]).reshape(out_features, in_features // 32, -1)
    scales = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    if ggml_type == "Q4_1":
        minimums = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        nibbles = blocks[..., 4:]
        codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1)
    else:
        minimums, codes = None, blocks[..., 2:].copy().view(np.int8)
    return torch.from_numpy(blocks.reshape(out_features, -1)), scales, minimums, torch.from_numpy(codes.astype(np.float64))


def _int8_arithmetic(x: torch.Tensor, scales, minimums, codes) -> torch.Tensor:
    """What the kernel computes, in float64: per row and block d_x = max|x| / 127, q_x = round(x / d_x); the
    exact integer sum of q_w q_x times d_w d_x, plus (Q4_1) m times the block's float sum of x."""
    rows, inputs = x.shape
    blocks = x.float().view(rows, inputs // 32, 32)
    largest = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    quantized = torch.round(blocks * inverse).clamp(-127, 127).double()
    sums = torch.einsum("rbi,obi->rob", quantized, codes)
    y = (sums * scales.double()[None] * (largest.squeeze(-1).double() / 127)[:, None, :]).sum(-1)
    if minimums is not None:
        y += (blocks.sum(-1).double()[:, None, :] * minimums.double()[None]).sum(-1)
    return y


def _linear(code: int, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
    _bf16_gemm.linear(code, x.data_ptr(), packed.data_ptr(), y.data_ptr(), x.shape[0], out_features, x.shape[1] // 2,
                      x.stride(0), y.stride(0), 2)
    return y


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("out_features,in_features", [(50, 576), (200, 64)])
def test_many_rows_compute_the_int8_arithmetic(ggml_type, out_features, in_features) -> None:
    blocks, scales, minimums, codes = _blocks(ggml_type, out_features, in_features, seed=out_features)
    ggml_format = GGML_FORMATS[ggml_type]
    packed = pack_ggml(ggml_format, blocks)
    generator = torch.Generator().manual_seed(1)
    for rows in (_bf16_gemm.int8_rows(), 9, 13, 37, 64):
        # Activations that quantize exactly (every block's largest is 127 / 8): every code and sum is then
        # exact, and only the float32 accumulation and the output's rounding to bf16 (2^-9) differ.
        exact = torch.randint(-127, 128, (rows, in_features), generator=generator).float()
        exact.view(rows, -1, 32)[:, :, 0] = 127
        exact[0, :32] = 0  # an all-zero block: scale 0, nothing divided by it
        x = (exact / 8).bfloat16()
        expected = _int8_arithmetic(x, scales, minimums, codes)
        y = _linear(ggml_format.int8_code, x, packed, out_features).double()
        assert ((y - expected).abs() <= expected.abs() * 2 ** -8 + 1e-6).all(), rows
        # Any activations: their rounding to codes as the reference rounds them, to within a few codes' ties.
        x = (torch.randn(rows, in_features, generator=generator) * 3).bfloat16()
        expected = _int8_arithmetic(x, scales, minimums, codes)
        y = _linear(ggml_format.int8_code, x, packed, out_features).double()
        assert (y - expected).abs().max() <= 0.01 * expected.abs().max(), rows


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0"])
def test_few_rows_keep_the_float_block_path(ggml_type) -> None:
    blocks, *_ = _blocks(ggml_type, 64, 128, seed=3)
    ggml_format = GGML_FORMATS[ggml_type]
    packed = pack_ggml(ggml_format, blocks)
    x = torch.randn(_bf16_gemm.int8_rows() - 1, 128).bfloat16()
    assert torch.equal(_linear(ggml_format.int8_code, x, packed, 64), _linear(ggml_format.code, x, packed, 64))


@pytest.fixture(scope="module")
def q4_1_gguf(tmp_path_factory):
    """A tiny Llama GGUF with Q4_1 and Q8_0 linear weights."""
    tiny = build_tiny("mistral", **OVERRIDES["mistral"], **SIZES)
    count = [0]

    def blocks(name: str, array: np.ndarray):
        if not name.endswith(tuple(f"{linear}.weight" for linear in LINEARS)):
            return None
        count[0] += 1
        ggml_type = "Q8_0" if count[0] % 3 == 0 else "Q4_1"
        return _blocks_like(array, ggml_type, seed=count[0]), ggml_type

    path = tmp_path_factory.mktemp("int8-activations") / "tiny-q4_1.gguf"
    write_gguf(tiny, "mistral", path, blocks=blocks)
    return path


def _engine(path, **overrides) -> Engine:
    return Engine(EngineConfig(model_id=str(path), backend="cpu", dtype="bfloat16", kv_cache_bytes=16 << 20,
                               progress=False, enable_prefix_caching=False, quantize="int8-activations", **overrides))


def _greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
    return [[t.id for o in output for t in o.new_tokens] for output in outputs]


def test_served_blocks_keep_no_dense_copy_and_the_decode_stack_matches_the_modules(q4_1_gguf) -> None:
    engine = _engine(q4_1_gguf)
    prepared = [module.quantized for module in engine.model.modules() if isinstance(module, Linear)]
    ggml = [weight for weight in prepared if isinstance(weight, PackedGGMLWeight)]
    assert ggml and all(weight.dense is None for weight in ggml)
    assert {weight.format for weight in ggml} == {GGML_FORMATS["Q4_1"], GGML_FORMATS["Q8_0"]}
    assert isinstance(engine.runner.forward, CapturedForward)
    # 20 sequences: steps above the kernel's int8 row count, in C and through the modules alike.
    rng = random.Random(4)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.choice([5, 40]))] for _ in range(20)]
    captured = _greedy(engine, prompts)
    engine.runner.forward = engine.model
    assert _greedy(engine, prompts) == captured


def test_the_blocks_without_dense_copy_survive_the_weight_cache(q4_1_gguf, tmp_path) -> None:
    first = _engine(q4_1_gguf, cache_dir=tmp_path)
    assert first.prepared_weights is not None
    expected = _greedy(first, [[5, 6, 7, 8]] * 9)
    second = _engine(q4_1_gguf, cache_dir=tmp_path)
    assert second._restoring
    ggml = [m.quantized for m in second.model.modules() if isinstance(getattr(m, "quantized", None), PackedGGMLWeight)]
    assert ggml and all(weight.dense is None for weight in ggml)
    assert _greedy(second, [[5, 6, 7, 8]] * 9) == expected
