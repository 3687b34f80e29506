"""Speculative decoding (`--speculate`): prompt-lookup drafts verified in one forward, on a tiny random Llama.

What a user notices: the same tokens as without it (greedy and seeded), stops and lengths exactly where
they would be, right logprobs, and a cache that gets every block back, cancelled requests included.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.grammar import GrammarSpec
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.speculate import NgramSpeculator, propose_ngram


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


def _engine(tiny, speculate: int, checkpoint=None, dtype: str = "float32", **overrides) -> Engine:
    config = EngineConfig(backend="cpu", dtype=dtype, kv_cache_bytes=8 << 20, progress=False, speculate=speculate,
                          **overrides)
    return Engine(config, checkpoint=checkpoint or tiny.checkpoint())


def _tokens(outputs) -> list[int]:
    return [t.id for o in outputs for t in o.new_tokens]


def _prompts(seed: int, count: int) -> list[list[int]]:
    """Prompts that repeat a short phrase, so prompt lookup has something to find."""
    rng = random.Random(seed)
    return [([rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 10))] * 10)[: rng.randrange(6, 70)]
            for _ in range(count)]


def _assert_every_block_free(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prompt_lookup_copies_what_followed_the_longest_earlier_match() -> None:
    assert propose_ngram([1, 2, 3, 9, 8, 1, 2, 3], 3) == [9, 8, 1]
    # "5 3" occurred at the start: it beats the later single "3"
    assert propose_ngram([5, 3, 7, 8, 3, 6, 5, 3], 3) == [7, 8, 3]
    assert propose_ngram([1, 2, 3, 4], 3) == []  # the last token is new
    assert propose_ngram([1, 2, 1, 2], 0) == []
    assert propose_ngram([7, 1, 2, 7, 1], 5) == [2, 7, 1]  # a continuation shorter than asked, up to the end
    # A lone repeated token is no match by default: too weak a guess to be worth verifying.
    assert propose_ngram([7, 1, 2, 7], 5) == []
    assert propose_ngram([7, 1, 2, 7], 5, min_ngram=1) == [1, 2, 7]


def test_drafts_only_where_they_can_be_verified() -> None:
    speculator = NgramSpeculator(num_draft=3, max_model_len=20)

    def request(num_tokens: int, computed: int, **params) -> Request:
        r = Request("r", list(range(4)), SamplingParams(**params))
        r.token_ids = [1, 2] * (num_tokens // 2)
        r.num_computed_tokens = computed
        return r

    assert speculator.room(request(10, 9, max_new_tokens=100)) == 3
    assert speculator.room(request(10, 5, max_new_tokens=100)) == 0  # mid-prompt
    assert speculator.room(request(10, 9, max_new_tokens=8)) == 1  # 6 out, 2 left: the draft and the next token
    assert speculator.room(request(18, 17, max_new_tokens=100)) == 1  # the model's length
    assert speculator.room(request(10, 9, max_new_tokens=100, grammar=GrammarSpec("json_object"))) == 0


# bfloat16 is the CPU's default: a verified draft token must get the bits a one-token decode gets there too.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_output_is_plain_decodings_batched_and_alone(tiny, dtype) -> None:
    prompts = _prompts(0, 6)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (5, 7, 24, 31, 2, 40)]
    plain = [_tokens(o) for o in _engine(tiny, 0, dtype=dtype).generate(prompts, params)]
    engine = _engine(tiny, 3, dtype=dtype)
    batched = [_tokens(o) for o in engine.generate(prompts, params)]
    alone = [_tokens(engine.generate([p], q)[0]) for p, q in zip(prompts, params)]
    assert batched == plain and alone == plain
    assert [len(t) for t in batched] == [p.max_new_tokens for p in params]  # never past max_new_tokens
    stats = engine.speculation
    assert stats.num_accepted_tokens > 0 and stats.tokens_per_forward > 1
    _assert_every_block_free(engine)


def test_a_stop_inside_an_accepted_draft_ends_the_answer_there(tiny) -> None:
    prompts = _prompts(1, 6)
    engine = _engine(tiny, 3)
    runs = engine.generate(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True))
    # A token that came out of a draft, not last in its step, and first of its kind in the answer.
    found = next((i, o.new_tokens[k].id) for i, outs in enumerate(runs) for o in outs
                 for k in range(len(o.new_tokens) - 1)
                 if o.new_tokens[k].id not in _tokens(outs)[: _tokens(outs).index(o.new_tokens[k].id)])
    index, stop = found
    checkpoint = dataclasses.replace(tiny.checkpoint(), eos_token_ids=(stop,))
    params = SamplingParams(max_new_tokens=40)
    plain = _engine(tiny, 0, checkpoint).generate([prompts[index]], params)[0]
    engine = _engine(tiny, 3, dataclasses.replace(tiny.checkpoint(), eos_token_ids=(stop,)))
    speculative = engine.generate([prompts[index]], params)[0]
    assert _tokens(speculative) == _tokens(plain) and _tokens(speculative)[-1] == stop
    assert speculative[-1].finish_reason == "eos_token"
    assert speculative[-1].num_generated_tokens == len(_tokens(plain))
    assert speculative[-1].generated_text == plain[-1].generated_text
    _assert_every_block_free(engine)
    # The same token as a request's stop token.
    by_stop = SamplingParams(max_new_tokens=40, ignore_eos=True, stop_token_ids=[stop])
    assert _tokens(_engine(tiny, 3).generate([prompts[index]], by_stop)[0]) == _tokens(plain)


def test_seeded_sampling_gives_the_same_tokens_with_and_without_speculation(tiny) -> None:
    prompts = _prompts(2, 4)
    params = [SamplingParams(max_new_tokens=24, temperature=0.7, top_k=20, repetition_penalty=1.05, seed=s,
                             ignore_eos=True) for s in (1, 2, 3, 4)]
    plain = [_tokens(o) for o in _engine(tiny, 0).generate(prompts, params)]
    engine = _engine(tiny, 3)
    # Sampled text of a random model rarely repeats two tokens in a row: guess after any repeated token.
    engine.speculator = NgramSpeculator(3, engine.max_model_len, min_ngram=1)
    assert [_tokens(o) for o in engine.generate(prompts, params)] == plain
    assert engine.speculation.num_accepted_tokens > 0
    _assert_every_block_free(engine)


def test_each_token_keeps_its_own_logprob_and_top_tokens(tiny) -> None:
    prompts = _prompts(3, 2)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=True, top_n_tokens=2)
    plain = _engine(tiny, 0).generate(prompts, params)
    engine = _engine(tiny, 3)
    speculative = engine.generate(prompts, params)
    assert engine.speculation.num_accepted_tokens > 0
    for a, b in zip(plain, speculative):
        tokens_a = [t for o in a for t in o.new_tokens]
        tokens_b = [t for o in b for t in o.new_tokens]
        assert [t.id for t in tokens_a] == [t.id for t in tokens_b]
        assert [t.logprob for t in tokens_b] == pytest.approx([t.logprob for t in tokens_a], abs=1e-4)
        tops_a = [[t.id for t in top] for o in a for top in o.new_top_tokens]
        assert tops_a == [[t.id for t in top] for o in b for top in o.new_top_tokens]
        assert b[-1].cumulative_logprob == pytest.approx(a[-1].cumulative_logprob, abs=1e-3)


def test_a_request_cancelled_with_a_draft_pending_frees_every_block(tiny) -> None:
    engine = _engine(tiny, 3)
    engine.add_request("cancelled", _prompts(4, 1)[0], SamplingParams(max_new_tokens=200, ignore_eos=True))
    engine.add_request("kept", _prompts(5, 1)[0], SamplingParams(max_new_tokens=30, ignore_eos=True))
    request = None
    for _ in range(100):
        engine.step()
        request = next((r for r in engine.scheduler.running if r.request_id == "cancelled"), None)
        if request is not None and request.draft_token_ids:
            break
    assert request is not None and request.draft_token_ids
    assert engine.abort("cancelled").finish_reason == "aborted"
    while engine.has_unfinished():
        engine.step()
    _assert_every_block_free(engine)


@pytest.mark.slow
def test_smollm2_copies_a_text_in_fewer_forwards_with_the_same_tokens() -> None:
    """The served default (the embedded SmolLM2, its default dtype and kernels) asked to repeat a text."""
    text = ("The history of computing stretches from mechanical calculators through vacuum tubes and transistors "
            "to the integrated circuits of today. Each generation made machines smaller, cheaper and faster.")
    outputs, stats = {}, {}
    for speculate in (0, 3):
        engine = Engine(EngineConfig(kv_cache_bytes=64 << 20, progress=False, speculate=speculate))
        chat = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Repeat this text exactly:\n\n{text}"}], add_generation_prompt=True,
            tokenize=False)
        prompt = engine.tokenizer(chat, add_special_tokens=False).input_ids
        outputs[speculate] = _tokens(engine.generate([prompt], SamplingParams(max_new_tokens=40))[0])
        stats[speculate] = engine.speculation
        _assert_every_block_free(engine)
    assert outputs[3] == outputs[0]
    assert stats[0].tokens_per_forward == 1
    assert stats[3].tokens_per_forward > 1.5
