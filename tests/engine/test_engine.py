"""The engine's behaviour under load, on a tiny random Llama: what a user of a busy server notices."""

from __future__ import annotations

import random

import pytest

from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama", max_position_embeddings=8192)


def _engine(tiny, kv_cache_bytes=8 << 20, **overrides) -> Engine:
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=kv_cache_bytes, progress=False, **overrides)
    return Engine(config, checkpoint=tiny.checkpoint())


def _tokens(outputs) -> list[int]:
    return [t.id for o in outputs for t in o.new_tokens]


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(4, VOCAB) for _ in range(length)]


def _run(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict[str, list]:
    """Add requests at the given step numbers and run until all finish; outputs per request id."""
    results: dict[str, list] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
            results[request_id] = []
        for out in engine.step():
            results[out.request_id].append(out)
        step += 1
    return results


def test_requests_arriving_at_different_steps_match_the_reference(tiny) -> None:
    rng = random.Random(0)
    prompts = [_prompt(rng, rng.randrange(5, 70)) for _ in range(6)]
    engine = _engine(tiny, max_num_batched_tokens=48)  # small budget: prompts get chunked too
    arrivals = {i * 3: [(f"r{i}", p, GREEDY)] for i, p in enumerate(prompts)}
    results = _run(engine, arrivals)
    for i, prompt in enumerate(prompts):
        assert _tokens(results[f"r{i}"]) == tiny.greedy(prompt, 12)


def test_prefix_cache_computes_only_the_new_tokens(tiny) -> None:
    engine = _engine(tiny)
    prompt = _prompt(random.Random(1), 200)
    first = engine.generate([prompt], GREEDY)[0]
    computed_before = engine.num_computed_prompt_tokens
    second = engine.generate([prompt], GREEDY)[0]
    computed = engine.num_computed_prompt_tokens - computed_before
    block = engine.layout.block_size
    assert second[0].num_cached_tokens == (len(prompt) - 1) // block * block
    assert computed == len(prompt) - second[0].num_cached_tokens
    assert computed < block + 1
    assert _tokens(second) == _tokens(first) == tiny.greedy(prompt, 12)


def test_tiny_cache_preempts_yet_every_request_finishes_right_and_blocks_come_back(tiny) -> None:
    rng = random.Random(2)
    engine = _engine(tiny, kv_cache_bytes=40 * 8192, max_num_seqs=32)  # 40 blocks of 16 tokens, 8 KiB each
    assert engine.num_blocks == 40
    prompts = [_prompt(rng, rng.randrange(10, 60)) for _ in range(32)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    outputs = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for prompt, outs in zip(prompts, outputs):
        assert _tokens(outs) == tiny.greedy(prompt, 24)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_a_4000_token_prompt_does_not_stop_running_decodes(tiny) -> None:
    rng = random.Random(3)
    engine = _engine(tiny, kv_cache_bytes=64 << 20, max_num_batched_tokens=512)
    decoding = {0: [(f"d{i}", _prompt(rng, 10), SamplingParams(max_new_tokens=40, ignore_eos=True))
                    for i in range(8)]}
    long_prompt = _prompt(rng, 4000)
    decoding[2] = [("long", long_prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))]
    results = _run(engine, decoding)
    records = list(engine.scheduler.step_records)
    prefill_steps = [r for r in records if "long" in r.request_ids and r.num_prefill_tokens > 0]
    assert len(prefill_steps) >= 8  # the prompt was spread over many steps
    for record in prefill_steps:
        decodes = [rid for rid in record.request_ids if rid.startswith("d")]
        assert record.num_decode_tokens == len(decodes) > 0
    assert all(len(_tokens(results[f"d{i}"])) == 40 for i in range(8))
    assert _tokens(results["long"]) == tiny.greedy(long_prompt, 2)


def test_a_seeded_request_samples_the_same_alone_and_in_a_busy_batch(tiny) -> None:
    rng = random.Random(4)
    prompt = _prompt(rng, 20)
    seeded = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = _tokens(_engine(tiny).generate([prompt], seeded)[0])
    busy = _engine(tiny)
    others = [(f"o{i}", _prompt(rng, rng.randrange(5, 40)),
               SamplingParams(max_new_tokens=20, temperature=1.2, ignore_eos=True)) for i in range(6)]
    results = _run(busy, {0: others[:3], 1: [("seeded", prompt, seeded)], 2: others[3:]})
    assert _tokens(results["seeded"]) == alone
    assert alone != tiny.greedy(prompt, 16)  # it really sampled


def test_abort_frees_blocks_at_once(tiny) -> None:
    engine = _engine(tiny)
    engine.add_request("x", _prompt(random.Random(5), 100), SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.num_blocks
    out = engine.abort("x")
    assert out.finished and out.finish_reason == "aborted"
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_prompt_logprobs_and_top_tokens_are_reported(tiny) -> None:
    import torch

    engine = _engine(tiny, max_num_batched_tokens=16)  # the prompt spans several chunks
    prompt = _prompt(random.Random(6), 40)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, prompt_logprobs=True, top_n_tokens=2, logprobs=True)
    outputs = engine.generate([prompt], params)[0]
    prefill = outputs[0].prompt_logprobs
    assert [t.id for t in prefill] == prompt and prefill[0].logprob is None
    with torch.no_grad():
        reference = torch.log_softmax(tiny.reference(torch.tensor([prompt])).logits[0], dim=-1)
    for i in range(1, len(prompt)):
        assert abs(prefill[i].logprob - reference[i - 1, prompt[i]].item()) < 1e-4
    for out in outputs:
        assert len(out.new_top_tokens[0]) == 2 and out.new_top_tokens[0][0].id == out.new_tokens[0].id


def test_async_engine_streams_and_cancels(tiny) -> None:
    import asyncio

    from tokenmill.async_engine import AsyncEngine

    engine = _engine(tiny)
    runner = AsyncEngine(engine).start()
    prompt = _prompt(random.Random(7), 30)

    async def main():
        tokens = [t.id async for out in runner.generate("a", prompt, GREEDY) for t in out.new_tokens]
        stream = runner.generate("b", prompt, SamplingParams(max_new_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # the client went away
        for _ in range(100):
            if engine.block_manager.num_free_blocks == engine.num_blocks and not engine.has_unfinished():
                break
            await asyncio.sleep(0.05)
        return tokens

    try:
        assert asyncio.run(main()) == tiny.greedy(prompt, 12)
        assert engine.block_manager.num_free_blocks == engine.num_blocks
    finally:
        runner.stop()
