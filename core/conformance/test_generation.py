"""End to end: the engine on this backend generates exactly transformers' greedy tokens (tiny Llama-family and
mixture-of-experts models, the latter through the backend's `tokenmill_moe_method`)."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill.conformance.tiny import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "mixtral", "qwen2_moe"])
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


def _speculative_runs(backend, dtype: torch.dtype):
    """The same prompts with `--speculate 0` and `--speculate 3`: per run, each answer's tokens (with their
    top 2) and the engine's speculation counters."""
    tiny = build_tiny("llama")
    rng = random.Random(1)
    # Repetitive prompts, so that prompt lookup finds drafts and some are accepted.
    prompts = [([rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 9))] * 12)[: rng.randrange(8, 60)]
               for _ in range(4)]
    runs = []
    for speculate in (0, 3):
        engine = Engine(EngineConfig(backend=backend.name, dtype=str(dtype).removeprefix("torch."),
                                     kv_cache_bytes=16 << 20, progress=False, max_num_batched_tokens=64,
                                     speculate=speculate),
                        backend=backend, checkpoint=tiny.checkpoint())
        outputs = engine.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=True,
                                                          top_n_tokens=2))
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        answers = [([t.id for o in outs for t in o.new_tokens], [top for o in outs for top in o.new_top_tokens])
                   for outs in outputs]
        assert all(len(tokens) == 24 for tokens, _ in answers)
        runs.append((answers, engine.speculation))
    return runs


@pytest.mark.paged_cache  # drafts are verified over the paged cache; a model that owns its cache refuses them
def test_speculative_decoding_keeps_greedy_output(backend, platform) -> None:
    """`--speculate`: draft tokens verified in one multi-token query per sequence over the paged cache, the
    rejected ones rolled back; the tokens are plain decoding's and every block comes back."""
    if torch.float32 not in platform.supported_dtypes:
        pytest.skip("token identity needs float32 support")
    (plain, _), (speculative, stats) = _speculative_runs(backend, torch.float32)
    assert [tokens for tokens, _ in speculative] == [tokens for tokens, _ in plain]
    assert stats.num_accepted_tokens > 0


@pytest.mark.paged_cache  # drafts are verified over the paged cache; a model that owns its cache refuses them
def test_speculative_decoding_at_the_preferred_dtype(backend, platform) -> None:
    """The same in the dtype the backend serves by default, where its compiled step
    (`tokenmill_compile_model`) takes what it covers of the verification steps. A verified token may be
    computed with other rounding than a one-token decode: an answer may leave plain decoding's only at a
    near tie, to plain decoding's runner-up."""
    if platform.preferred_dtype == torch.float32:
        pytest.skip("the preferred dtype is float32: the case above")
    (plain, _), (speculative, stats) = _speculative_runs(backend, platform.preferred_dtype)
    assert stats.num_accepted_tokens > 0
    for (expected, tops), (tokens, _) in zip(plain, speculative):
        parted = next((k for k, (a, b) in enumerate(zip(expected, tokens)) if a != b), None)
        if parted is not None:
            first, second = tops[parted]
            assert tokens[parted] == second.id and first.logprob - second.logprob < 0.1, (
                f"the answer left plain decoding's at token {parted}, not at a near tie")
