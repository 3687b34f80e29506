"""The official clients, unchanged, against `tokenmill serve` on the embedded SmolLM2."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_openai_chat_completions(served_smollm2) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{served_smollm2}/v1", api_key="unused")
    # The bare question's first token is a near tie in bf16 ("The" / "L'Étoile..."), which the order of a
    # linear's float32 sums decides (AVX512-BF16 against AMX tiles); this one's leads by 0.9 in logprob.
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    reply = client.chat.completions.create(model="tgi", messages=messages, max_tokens=20, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model="tgi", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_openai_chat_n_and_logprobs(served_smollm2) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{served_smollm2}/v1", api_key="unused")
    reply = client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Say hi"}],
                                           max_tokens=8, temperature=0.8, seed=3, n=2, logprobs=True,
                                           top_logprobs=2)
    assert len(reply.choices) == 2
    for choice in reply.choices:
        assert choice.logprobs.content and len(choice.logprobs.content[0].top_logprobs) == 2


def test_openai_completions(served_smollm2) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{served_smollm2}/v1", api_key="unused")
    reply = client.completions.create(model="tgi", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in reply.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tgi", prompt="The capital of France is", max_tokens=5, temperature=0, stream=True))
    assert streamed == reply.choices[0].text


def test_text_generation_client(served_smollm2) -> None:
    from text_generation import Client

    client = Client(served_smollm2, timeout=120)  # its default 10 s is tight on a loaded 2-core machine
    response = client.generate("The capital of France is", max_new_tokens=8, decoder_input_details=True)
    assert "Paris" in response.generated_text
    assert response.details.generated_tokens == len(response.details.tokens) == 8
    assert response.details.prefill and response.details.prefill[0].logprob is None
    tokens = list(client.generate_stream("The capital of France is", max_new_tokens=8))
    assert tokens[-1].generated_text == response.generated_text
    assert [t.token.id for t in tokens] == [t.id for t in response.details.tokens]
    sampled = client.generate("Once upon a time", max_new_tokens=6, do_sample=True, top_k=20, seed=5,
                              best_of=None)
    assert sampled.details.seed == 5


def test_openai_client_with_vllm_sampling_extensions(served_smollm2) -> None:
    """Issue #17's acceptance on the live server: a banned token stays out of greedy output, min_tokens
    holds back EOS, top_k=1 sampling is greedy."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{served_smollm2}/v1", api_key="unused")
    prompt = "The capital of France is"
    greedy = client.completions.create(model="tgi", prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    tokens = greedy.choices[0].logprobs.tokens
    banned_id = httpx.post(f"{served_smollm2}/tokenize", json={"inputs": tokens[0], "add_special_tokens": False},
                           timeout=30).json()
    banned_id = [t["id"] for t in banned_id]
    assert len(banned_id) == 1, banned_id
    banned = client.completions.create(model="tgi", prompt=prompt, max_tokens=8, temperature=0, logprobs=0,
                                       logit_bias={str(banned_id[0]): -100})
    assert tokens[0] not in banned.choices[0].logprobs.tokens

    sampled = client.completions.create(model="tgi", prompt=prompt, max_tokens=8, temperature=1.5, seed=3,
                                        extra_body={"top_k": 1})
    assert sampled.choices[0].text == greedy.choices[0].text

    messages = [{"role": "user", "content": "Say hi"}]
    short = client.chat.completions.create(model="tgi", messages=messages, max_tokens=64, temperature=0)
    assert short.choices[0].finish_reason == "stop"  # the model ended it: EOS
    n = short.usage.completion_tokens
    held = client.chat.completions.create(model="tgi", messages=messages, max_tokens=64, temperature=0,
                                          extra_body={"min_tokens": n + 8})
    assert held.usage.completion_tokens >= n + 8


def test_text_generation_client_watermark(served_smollm2) -> None:
    from text_generation import Client

    from tokenmill.watermark import detect

    client = Client(served_smollm2, timeout=120)
    prompt = "The history of the Roman Empire begins"
    prompt_last = client.generate(prompt, max_new_tokens=1, decoder_input_details=True).details.prefill[-1].id

    def z_over_200_tokens(watermark: bool) -> float:
        """Generations of successive seeds pooled until they hold 200 tokens (EOS may end one early)."""
        green = scored = 0
        for seed in range(1, 30):
            response = client.generate(prompt, max_new_tokens=200 - scored, do_sample=True, seed=seed,
                                       watermark=watermark)
            score = detect([prompt_last] + [t.id for t in response.details.tokens])
            green, scored = green + score.num_green, scored + score.num_tokens
            if scored >= 200:
                return (green - 0.5 * scored) / (scored * 0.25) ** 0.5
        raise AssertionError("fewer than 200 tokens from 29 requests")

    with ThreadPoolExecutor(2) as pool:  # both in one continuous batch: half the wall time of one after the other
        marked, unmarked = pool.map(z_over_200_tokens, (True, False))
    assert marked > 4 > unmarked
