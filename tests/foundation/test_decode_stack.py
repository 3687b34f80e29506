"""The CPU backend's captured decode step (plugins/cpu/decode_stack.py): the same numbers as the
module-by-module forward, bit for bit, and taken only for the models and steps it covers."""

from __future__ import annotations

import random

import pytest

from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.plugins.cpu.decode_stack import CapturedForward, DecodeStack
from tokenmill.plugins.cpu.quant import bf16_gemm_available
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not bf16_gemm_available(), reason="the decode stack needs AVX512-BF16 kernels")


def _engine(family: str, dtype: str = "bfloat16", quantize: str | None = None) -> Engine:
    # No prefix cache: the second run must recompute the prompts exactly as the first did.
    config = EngineConfig(backend="cpu", dtype=dtype, kv_cache_bytes=16 << 20, progress=False,
                          enable_prefix_caching=False, quantize=quantize)
    return Engine(config, checkpoint=build_tiny(family).checkpoint())


def _tokens_and_logprobs(engine: Engine, prompts: list[list[int]]) -> list[list[tuple[int, float]]]:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True)
    return [[(t.id, t.logprob) for o in outputs for t in o.new_tokens] for outputs in engine.generate(prompts, params)]


@pytest.mark.parametrize("family,num_prompts", [("llama", 3), ("llama_tied", 3), ("phi3", 3), ("llama", 40)])
def test_captured_decode_steps_match_the_module_forward_bit_for_bit(family, num_prompts) -> None:
    # 40 sequences cross the row count where the linears change kernels: both paths must change alike.
    engine = _engine(family)
    assert isinstance(engine.runner.forward, CapturedForward)
    rng = random.Random(num_prompts)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.choice([5, 40, 90]))] for _ in range(num_prompts)]
    captured = _tokens_and_logprobs(engine, prompts)
    engine.runner.forward = engine.model
    assert _tokens_and_logprobs(engine, prompts) == captured


@pytest.mark.parametrize("family,dtype,quantize", [("qwen2", "bfloat16", None), ("mistral", "bfloat16", None),
                                                   ("qwen3", "bfloat16", None), ("llama", "float32", None),
                                                   ("llama", "bfloat16", "int8")])
def test_models_the_decode_stack_does_not_cover_run_module_by_module(family, dtype, quantize) -> None:
    # q/k/v biases, a sliding window, q/k norms, float32, int8 weights: the C path has none of them.
    engine = _engine(family, dtype, quantize)
    assert DecodeStack.build(engine.model) is None
    assert engine.runner.forward is engine.model
    assert len(engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]) == 3
