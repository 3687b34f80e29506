"""Length-dependent RoPE scalings (dynamic NTK, longrope) in a continuous batch: a sequence's tokens are
those transformers gives it alone, whatever its batch and however its prompt is split into chunks."""

from __future__ import annotations

import random

import pytest

from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import ValidationError
from tokenmill.sampling_params import SamplingParams


@pytest.mark.parametrize("family", ["llama_dynamic", "phi3_longrope"])
def test_chunked_prefill_in_a_batch_matches_transformers_alone(family: str) -> None:
    tiny = build_tiny(family)
    # 13-token chunks: prompts past the 32-token threshold are fed in parts, beside others' decodes.
    engine = Engine(EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=8 << 20, progress=False,
                                 max_num_batched_tokens=13), checkpoint=tiny.checkpoint())
    assert engine.prefix_caching.startswith("disabled")  # a prompt's keys depend on its length
    rng = random.Random(11)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in (45, 26, 8)]  # past, across, short of 32
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=14, ignore_eos=True, prompt_logprobs=True))
    for prompt, output in zip(prompts, outputs):
        assert [t.id for o in output for t in o.new_tokens] == tiny.greedy(prompt, 14)
        # The 26-token prompt is fed again when longrope recomputes it: its logprobs are reported once.
        assert [t.id for o in output for t in o.prompt_logprobs or ()] == prompt


def test_longrope_refuses_speculative_decoding() -> None:
    tiny = build_tiny("phi3_longrope")
    with pytest.raises(ValidationError, match="--speculate"):
        Engine(EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=8 << 20, progress=False, speculate=3),
               checkpoint=tiny.checkpoint())
