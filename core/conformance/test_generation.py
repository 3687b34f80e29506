"""End to end: the engine on this backend generates exactly transformers' greedy tokens (tiny Llama)."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill.conformance.tiny import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_greedy_generation_matches_the_reference(backend, platform, family) -> None:
    if torch.float32 not in platform.supported_dtypes:
        pytest.skip("token identity with the float32 reference needs float32 support")
    tiny = build_tiny(family)
    engine = Engine(EngineConfig(backend=backend.name, dtype="float32", kv_cache_bytes=16 << 20, progress=False,
                                 max_num_batched_tokens=64),
                    backend=backend, checkpoint=tiny.checkpoint())
    rng = random.Random(0)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 90))] for _ in range(5)]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
    for prompt, outs in zip(prompts, outputs):
        assert [t.id for o in outs for t in o.new_tokens] == tiny.greedy(prompt, 16)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # blocks, or slots


def test_speculative_decoding_keeps_greedy_output(backend, platform) -> None:
    """`--speculate`: draft tokens verified in one multi-token query per sequence over the paged cache, the
    rejected ones rolled back; the tokens are plain decoding's and every block comes back."""
    if torch.float32 not in platform.supported_dtypes:
        pytest.skip("token identity needs float32 support")
    tiny = build_tiny("llama")

    def run(speculate: int):
        engine = Engine(EngineConfig(backend=backend.name, dtype="float32", kv_cache_bytes=16 << 20, progress=False,
                                     max_num_batched_tokens=64, speculate=speculate),
                        backend=backend, checkpoint=tiny.checkpoint())
        outputs = engine.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return [[t.id for o in outs for t in o.new_tokens] for outs in outputs], engine.speculation

    rng = random.Random(1)
    # Repetitive prompts, so that prompt lookup finds drafts and some are accepted.
    prompts = [([rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 9))] * 12)[: rng.randrange(8, 60)]
               for _ in range(4)]
    plain, _ = run(0)
    speculative, stats = run(3)
    assert speculative == plain
    assert stats.num_accepted_tokens > 0
