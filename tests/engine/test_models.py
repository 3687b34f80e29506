"""Every supported family, on tiny random weights: logits and greedy tokens equal transformers'."""

from __future__ import annotations

import random

import pytest
import torch

from tests.tiny_models import FAMILIES, VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.models import UnsupportedArchitectureError, get_model_class
from tokenmill.sampling_params import SamplingParams


def _engine(tiny, **overrides) -> Engine:
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=8 << 20, progress=False, **overrides)
    return Engine(config, checkpoint=tiny.checkpoint())


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 60))] for _ in range(count)]


def _tokens(outputs) -> list[int]:
    return [t.id for o in outputs for t in o.new_tokens]


def _staggered(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Greedy tokens of each prompt, prompt i joining the running batch at step 2 * i."""
    tokens: dict[str, list[int]] = {}
    step = 0
    while step <= 2 * (len(prompts) - 1) or engine.has_unfinished():
        if step % 2 == 0 and step // 2 < len(prompts):
            engine.add_request(f"r{step // 2}", prompts[step // 2], params)
            tokens[f"r{step // 2}"] = []
        for out in engine.step():
            tokens[out.request_id] += [t.id for t in out.new_tokens]
        step += 1
    return [tokens[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers_alone_batched_and_staggered(family: str) -> None:
    tiny = build_tiny(family)
    engine = _engine(tiny)
    prompts = _prompts(4, seed=len(family))
    expected = [tiny.greedy(p, 20) for p in prompts]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=True)
    alone = [_tokens(engine.generate([p], params)[0]) for p in prompts]
    together = [_tokens(outputs) for outputs in engine.generate(prompts, params)]
    # A fresh cache and a small token budget: prompts are computed anew, in chunks, beside other
    # requests' decodes and chunks.
    staggered = _staggered(_engine(tiny, max_num_batched_tokens=24), prompts, params)
    assert alone == expected
    assert together == expected
    assert staggered == expected


# Gemma 2's final soft cap and Granite's logits_scaling keep the argmax: logprobs are where they show.
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma2", "granite"])
def test_logprobs_match_transformers(family: str) -> None:
    tiny = build_tiny(family)
    engine = _engine(tiny)
    prompt = _prompts(1, seed=7)[0]
    outputs = engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=True))[0]
    tokens = [t for o in outputs for t in o.new_tokens]
    full = torch.tensor([prompt + [t.id for t in tokens]])
    with torch.no_grad():
        reference = torch.log_softmax(tiny.reference(full).logits[0].float(), dim=-1)
    for i, token in enumerate(tokens):
        expected = reference[len(prompt) - 1 + i, token.id].item()
        assert abs(token.logprob - expected) < 1e-4


def test_sliding_window_is_exercised_beyond_the_window() -> None:
    # Gemma 2/3 and StarCoder2 have 8-token windows, which every prompt above crosses as it generates.
    tiny = build_tiny("mistral")
    engine = _engine(tiny)
    prompt = _prompts(1, seed=3)[0] * 2  # longer than the 24-token window
    assert len(prompt) > 24
    outputs = engine.generate([prompt], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
    assert _tokens(outputs) == tiny.greedy(prompt, 30)


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    class Config:
        architectures = ["GPTNeoXForCausalLM"]

    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        get_model_class(Config())
