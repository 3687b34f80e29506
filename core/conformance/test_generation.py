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
