"""`--kv-cache-dtype`: a one-byte KV cache holds about twice the sequences of a bfloat16 one in the same
memory, gives close logprobs, keeps prefix caching and speculative decoding working, and a backend whose
layout cannot store the asked dtype refuses at start naming the ones it can."""

from __future__ import annotations

import pytest

from tests.tiny_models import build_tiny
from tokenmill.backend import Backend
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import ValidationError
from tokenmill.registry import load_registry
from tokenmill.sampling_params import SamplingParams

KV_BYTES = 4 << 20
PROMPTS = [[5 + i % 50 for i in range(n)] for n in (7, 40, 90)]
# Largest logprob difference from the bfloat16 cache's: int8 rounds to 1/254 of a row's largest value, fp8 e4m3
# to 1/16 of each value (measured: 0.004 and 0.008).
TOLERANCE = {"int8": 0.02, "fp8_e4m3": 0.05}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama", head_dim=64)  # SmolLM2's head size: the scales' share of a row is as served


def _engine(tiny, kv_cache_dtype: str, backend: Backend | None = None, **overrides) -> Engine:
    config = EngineConfig(backend="cpu", dtype="bfloat16", kv_cache_bytes=KV_BYTES, progress=False,
                          kv_cache_dtype=kv_cache_dtype, **overrides)
    return Engine(config, backend=backend, checkpoint=tiny.checkpoint())


def _scores(engine: Engine) -> list[tuple[list[float], list[tuple[int, float, float]]]]:
    """Per prompt of PROMPTS: its tokens' logprobs, and (id, logprob, margin over the runner-up) of each
    greedy token."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=True, prompt_logprobs=True, top_n_tokens=2)
    scores = []
    for outputs in engine.generate(PROMPTS, params):
        prompt = [t.logprob for t in outputs[0].prompt_logprobs[1:]]
        greedy = [(t.id, t.logprob, top[0].logprob - top[1].logprob)
                  for o in outputs for t, top in zip(o.new_tokens, o.new_top_tokens)]
        scores.append((prompt, greedy))
    return scores


@pytest.fixture(scope="module")
def bf16(tiny):
    engine = _engine(tiny, "auto", enable_prefix_caching=False)
    return engine, _scores(engine)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_a_one_byte_cache_holds_1_8x_the_sequences_and_keeps_logprobs_close(tiny, bf16, kv_cache_dtype) -> None:
    bf16_engine, bf16_scores = bf16
    engine = _engine(tiny, kv_cache_dtype, enable_prefix_caching=False)
    assert engine.num_blocks >= 1.8 * bf16_engine.num_blocks
    assert engine.kv_capacity_tokens >= 1.8 * bf16_engine.kv_capacity_tokens  # what the server reports
    tolerance, differences = TOLERANCE[kv_cache_dtype], []
    for (prompt, greedy), (bf16_prompt, bf16_greedy) in zip(_scores(engine), bf16_scores):
        differences += [abs(a - b) for a, b in zip(prompt, bf16_prompt)]
        for (token, logprob, _), (bf16_token, bf16_logprob, margin) in zip(greedy, bf16_greedy):
            if token != bf16_token:  # only where the bfloat16 cache's choice was a near tie
                assert margin < 2 * tolerance
                break
            differences.append(abs(logprob - bf16_logprob))
    assert 0 < max(differences) < tolerance  # rounded, and close


def test_prefix_hits_and_speculative_decoding_read_the_quantized_blocks(tiny) -> None:
    """A prompt served again reuses its cached (quantized) blocks and gets the same output; --speculate gives
    the greedy output of plain decoding over the same cache, rejected drafts overwritten."""
    plain = _engine(tiny, "fp8_e4m3", enable_prefix_caching=False)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = [7, 8, 9, 10] * 10  # repetitive, so prompt lookup finds drafts
    expected = [t.id for o in plain.generate([prompt], params)[0] for t in o.new_tokens]
    engine = _engine(tiny, "fp8_e4m3", speculate=3)
    for _ in range(2):
        computed = engine.num_computed_prompt_tokens
        assert [t.id for o in engine.generate([prompt], params)[0] for t in o.new_tokens] == expected
    assert engine.num_computed_prompt_tokens - computed < len(prompt)  # the second run hit the prefix cache
    assert engine.speculation.num_draft_tokens > 0  # drafts were verified over the quantized cache


class ModelDtypeOnlyCPU(Backend):
    """The CPU backend with a layout that stores only the model's dtype, as the GPU layouts do today."""

    def __init__(self) -> None:
        super().__init__(load_registry(), "cpu")

    def kv_cache_layout(self, shape, device):
        layout = super().kv_cache_layout(shape, device)
        layout.cache_dtypes = ("auto",)
        return layout


def test_a_backend_that_cannot_store_the_dtype_refuses_naming_what_it_can(tiny) -> None:
    with pytest.raises(ValidationError, match=r"cannot store the KV cache as fp8.*its KV cache dtypes: auto \(bfloat16\)"):
        _engine(tiny, "fp8", backend=ModelDtypeOnlyCPU())
    assert _engine(tiny, "bfloat16", backend=ModelDtypeOnlyCPU()).num_blocks > 0  # the model's own dtype
