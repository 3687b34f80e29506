"""The CPU backend's captured decode step (plugins/cpu/decode_stack.py): the same numbers as the
module-by-module forward, bit for bit, and taken only for the models and steps it covers."""

from __future__ import annotations

import random

import pytest
import torch

from tests.tiny_models import VOCAB, build_tiny
from tokenmill.conformance.tiny import perturb_constant_parameters
from tokenmill.engine import Engine, EngineConfig
from tokenmill.model_runner import SequenceStep
from tokenmill.interfaces import QuantizedWeight
from tokenmill.layers.linear import Linear
from tokenmill.plugins.cpu.decode_stack import CapturedForward, DecodeStack, compile_model
from tokenmill.plugins.cpu.quant import (
    PackedBF16Linear,
    PackedBF16Weight,
    PackedGroupedWeight,
    bf16_gemm_available,
    block_kernels_available,
)
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not bf16_gemm_available(), reason="the decode stack needs the bf16 kernels (AVX512-BF16 or AVX2)")


def _engine(family: str, dtype: str = "bfloat16", quantize: str | None = None, kv_cache_dtype: str = "auto") -> Engine:
    # No prefix cache: the second run must recompute the prompts exactly as the first did.
    config = EngineConfig(backend="cpu", dtype=dtype, kv_cache_bytes=16 << 20, progress=False,
                          enable_prefix_caching=False, quantize=quantize, kv_cache_dtype=kv_cache_dtype)
    tiny = build_tiny(family)
    # transformers starts biases at zero and norm weights at one (Qwen2's, Qwen3's): a bias the C step dropped,
    # or a norm weight it did not apply, would go unseen.
    perturb_constant_parameters(tiny.reference, seed=0)
    return Engine(config, checkpoint=tiny.checkpoint())


def _tokens_and_logprobs(engine: Engine, prompts: list[list[int]]) -> list[list[tuple[int, float]]]:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True)
    return [[(t.id, t.logprob) for o in outputs for t in o.new_tokens] for outputs in engine.generate(prompts, params)]


@pytest.mark.parametrize("family,num_prompts", [("llama", 3), ("llama_tied", 3), ("phi3", 3), ("llama", 40),
                                                ("qwen2", 3), ("qwen3", 3), ("qwen3", 40), ("mistral", 3)])
def test_captured_decode_steps_match_the_module_forward_bit_for_bit(family, num_prompts) -> None:
    # 40 sequences cross the row count where the linears change kernels: both paths must change alike. Qwen2
    # adds q/k/v biases in the C step, Qwen3 normalises each query and key head there, and the tiny Mistral's
    # 24-position window is crossed by the 40- and 90-token prompts.
    engine = _engine(family)
    assert isinstance(engine.runner.forward, CapturedForward)
    rng = random.Random(num_prompts)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.choice([5, 40, 90]))] for _ in range(num_prompts)]
    captured = _tokens_and_logprobs(engine, prompts)
    engine.runner.forward = engine.model
    assert _tokens_and_logprobs(engine, prompts) == captured


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_captured_steps_over_a_quantized_cache_match_the_module_forward_bit_for_bit(kv_cache_dtype) -> None:
    # The C step quantizes the keys and values it writes as the module path's PyTorch code does, byte for byte.
    engine = _engine("llama", kv_cache_dtype=kv_cache_dtype)
    assert isinstance(engine.runner.forward, CapturedForward)
    rng = random.Random(3)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.choice([5, 40, 90]))] for _ in range(4)]
    captured = _tokens_and_logprobs(engine, prompts)
    engine.runner.forward = engine.model
    assert _tokens_and_logprobs(engine, prompts) == captured


def _as_uint4_groups_of_32(prepared: PackedBF16Weight) -> QuantizedWeight:
    """A packed dense weight quantized as a checkpoint would store it: uint4 codes, scale and offset per 32."""
    weight = prepared.packed.permute(0, 2, 1, 3).reshape(-1, prepared.in_features)[:prepared.out_features].float()
    groups = weight.view(weight.shape[0], -1, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = (high - low).clamp(min=1e-6) / 15
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight("gptq", "uint4", codes.view_as(weight), scales, low, 32)


@pytest.mark.skipif(not block_kernels_available(), reason="the block kernels need AVX512-BF16")
def test_captured_steps_over_grouped_quantized_weights_match_the_module_forward_bit_for_bit() -> None:
    # A checkpoint's int4 weights: the C step calls their kernel as the modules do, at every row count (34
    # sequences cross the one where it dequantizes panels instead).
    engine = _engine("llama")
    method = PackedBF16Linear()
    for module in engine.model.modules():
        if isinstance(module, Linear) and isinstance(module.quantized, PackedBF16Weight):
            module.quantized = method.prepare_quantized(_as_uint4_groups_of_32(module.quantized))
            assert isinstance(module.quantized, PackedGroupedWeight)
    engine.runner.forward = compile_model(engine.model)
    assert isinstance(engine.runner.forward, CapturedForward)
    rng = random.Random(5)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.choice([5, 12]))] for _ in range(34)]
    captured = _tokens_and_logprobs(engine, prompts)
    engine.runner.forward = engine.model
    assert _tokens_and_logprobs(engine, prompts) == captured


@pytest.mark.parametrize("family,dtype,quantize", [("llama", "float32", None),
                                                   ("llama", "bfloat16", "int8"), ("gemma2", "bfloat16", None),
                                                   ("gemma3", "bfloat16", None), ("granite", "bfloat16", None),
                                                   ("starcoder2", "bfloat16", None), ("phi", "bfloat16", None),
                                                   ("llama_dynamic", "bfloat16", None), ("phi3_longrope", "bfloat16", None)])
def test_models_the_decode_stack_does_not_cover_run_module_by_module(family, dtype, quantize) -> None:
    # float32, int8 weights, RoPE computed per step (dynamic, longrope), windows on some layers only (Gemma's,
    # Starcoder2's in its own blocks), and the families whose blocks are not Llama's (Gemma's, Granite's multipliers, LayerNorms,
    # Phi-2's parallel block): the C path has none of them.
    engine = _engine(family, dtype, quantize)
    assert DecodeStack.build(engine.model) is None
    assert engine.runner.forward is engine.model
    assert len(engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]) == 3


def test_a_llama_subclass_with_its_own_forward_runs_module_by_module() -> None:
    # Granite-like: Llama's blocks and weights, but a forward the C step does not transcribe.
    engine = _engine("llama")
    assert DecodeStack.build(engine.model) is not None

    class ScaledEmbeddings(type(engine.model)):
        def forward(self, input_ids, positions, kv_caches, metadata):
            return super().forward(input_ids, positions, kv_caches, metadata) * 2

    engine.model.__class__ = ScaledEmbeddings
    assert DecodeStack.build(engine.model) is None


def test_a_verification_query_gets_the_logits_of_one_token_decodes_bit_for_bit() -> None:
    """Speculative decoding's verification step (a sequence's last token and its drafts as one query, beside
    others) runs in the C step, and each fed token gets the logits a one-token decode at its place gets:
    what keeps greedy output the same with and without `--speculate` in bfloat16."""
    engine = _engine("llama")
    runner = engine.runner
    assert isinstance(runner.forward, CapturedForward)
    stack, taken = runner.forward.stack, []

    class Counting:  # the stack, counting the steps it takes
        supports = stack.supports

        def __call__(self, *args):
            taken.append(args[3].max_query_len)
            return stack(*args)

    runner.forward.stack = Counting()
    rng = random.Random(7)
    block_size = engine.layout.block_size
    # (context length, fed tokens): contexts and queries that cross block boundaries; one plain decode.
    shapes = [(block_size - 2, 4), (2 * block_size + 5, 3), (9, 1), (40, 4)]
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n, _ in shapes]
    fed = [[rng.randrange(4, VOCAB) for _ in range(q)] for _, q in shapes]
    tables, first = [], 1
    for (n, q) in shapes:
        blocks = -(-(n + q) // block_size)
        tables.append(list(range(first, first + blocks)))
        first += blocks

    def prefill() -> None:
        runner.execute([SequenceStep(p, 0, t, 1) for p, t in zip(prompts, tables)])

    prefill()
    one_by_one = [[] for _ in shapes]
    for k in range(max(q for _, q in shapes)):
        live = [i for i, tokens in enumerate(fed) if k < len(tokens)]
        logits = runner.execute([SequenceStep([fed[i][k]], len(prompts[i]) + k, tables[i], 1) for i in live])
        for row, i in enumerate(live):
            one_by_one[i].append(logits[row])
    expected = torch.stack([row for rows in one_by_one for row in rows])
    assert taken[0] == max(n for n, _ in shapes) and set(taken[1:]) == {1}  # prompts and decodes, all in C

    def verify() -> torch.Tensor:
        return runner.execute([SequenceStep(tokens, len(p), t, len(tokens))
                               for p, t, tokens in zip(prompts, tables, fed)])

    taken.clear()
    assert torch.equal(verify(), expected)
    assert taken == [4]  # the verification step ran in C
    # The module-by-module forward attends such queries row by row too: the same bits.
    runner.forward = engine.model
    prefill()
    assert torch.equal(verify(), expected)
