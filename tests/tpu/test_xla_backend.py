"""The tpu backend on torch-xla, run on XLA's CPU device (`make conformance BACKEND=tpu` runs this file).

Skipped where torch-xla is not installed (the main suite's venv): it lives in `.venv-tpu`, whose torch
(2.9, for torch-xla 2.9) differs from the main suite's. What it proves on XLA's CPU device: the same
greedy tokens as the cpu backend, and no XLA compilation once warm-up has run every bucket, counted
by XLA itself (its CompileTime metric, which `tokenmill_compiles_total` reports).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from concurrent import futures

import httpx
import pytest

pytest.importorskip("torch_xla", reason="the tpu backend needs torch-xla: make conformance BACKEND=tpu")
if os.environ.get("PJRT_DEVICE") is None:
    pytest.skip("PJRT_DEVICE is not set (make conformance BACKEND=tpu sets it)", allow_module_level=True)

from tests.api.conftest import free_port, wait_healthy  # noqa: E402
from tests.tiny_models import VOCAB, build_tiny  # noqa: E402
from tokenmill.engine import Engine, EngineConfig  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

LIMITS = dict(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=256)


def _config(backend: str) -> EngineConfig:
    return EngineConfig(backend=backend, dtype="float32", kv_cache_bytes=32 << 20, progress=False, **LIMITS)


def _greedy_tokens(outputs) -> list[list[int]]:
    return [[t.id for o in request for t in o.new_tokens] for request in outputs]


def test_every_bucket_compiles_once_and_serving_compiles_nothing() -> None:
    tiny = build_tiny("llama", max_position_embeddings=256)
    engine = Engine(_config("tpu"), checkpoint=tiny.checkpoint())
    engine.warmup(progress=False)
    warmed = engine.num_compiles
    assert warmed > 0 and engine.num_step_shapes > 3

    # Every shape warm-up ran, once more: each was compiled once, none compiles again.
    for steps in engine._reachable_step_shapes().values():
        engine.runner.execute(steps)
    assert engine.num_compiles == warmed

    rng = random.Random(0)
    lengths = [3, 17, 40, 150, 1, 70, 9, 33, 64, 5]
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in lengths]
    greedy = SamplingParams(max_new_tokens=9, ignore_eos=True)
    mixed = [SamplingParams(max_new_tokens=rng.randrange(1, 12), ignore_eos=True, temperature=0.7, top_k=10,
                            top_p=0.9, seed=i, top_n_tokens=2, prompt_logprobs=i == 3, repetition_penalty=1.2)
             for i in range(len(prompts))]
    got = engine.generate(prompts, greedy)
    engine.generate(prompts, mixed)  # sampled on the host: any mix of settings is one more host op, no graph
    assert engine.num_compiles == warmed, "a request compiled a new XLA graph after warm-up"
    assert engine.block_manager.usage == 0

    reference = Engine(_config("cpu"), checkpoint=tiny.checkpoint())
    assert _greedy_tokens(got) == _greedy_tokens(reference.generate(prompts, greedy))


PROMPTS = ["The capital of France is", "Write a haiku about the sea.\n",
           "List three prime numbers greater than one hundred, separated by commas, and explain how you know "
           "that each of them is prime:", "Hello"]
MAX_TOKENS = 12


def _compiles(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return float(re.search(r"^tokenmill_compiles_total (\S+)$", text, re.M).group(1))


def _mixed_request(url: str, i: int) -> None:
    """One of 64 requests over the TGI and OpenAI routes: lengths, sampling and streaming vary with `i`."""
    rng = random.Random(i)
    prompt = " ".join(rng.choice(["tea", "river", "seven", "blue", "why", "stone"]) for _ in range(rng.randrange(1, 40)))
    tokens = rng.randrange(1, 7)
    sampled = {"temperature": 0.8, "top_p": 0.9, "seed": i} if i % 2 else {}
    route = i % 4
    if route == 0:
        response = httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": {
            "max_new_tokens": tokens, "do_sample": bool(sampled), **sampled, "details": True}}, timeout=600)
    elif route == 1:
        response = httpx.post(f"{url}/generate_stream", json={"inputs": prompt, "parameters": {
            "max_new_tokens": tokens, **sampled}}, timeout=600)
        events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
        assert events and events[-1]["generated_text"] is not None, response.text
    elif route == 2:
        response = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": tokens, **sampled},
                              timeout=600)
    else:
        response = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "stream": bool(i % 3),
            **sampled}, timeout=600)
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_served_smollm2_on_xla_matches_the_cpu_backend_and_compiles_nothing_after_warmup(tmp_path) -> None:
    engine = Engine(EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=32 << 20, progress=False, **LIMITS))
    prompts = [engine.tokenizer(p).input_ids for p in PROMPTS]
    expected = [outs[-1].generated_text for outs in engine.generate(
        prompts, SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True))]
    del engine

    port = free_port()
    command = [sys.executable, "-m", "tokenmill.cli", "serve", "--backend", "tpu", "--hostname", "127.0.0.1",
               "--port", str(port), "--grpc-port", "0", "--dtype", "float32", "--kv-cache-bytes", str(32 << 20),
               "--max-batch-prefill-tokens", "64", "--max-batch-size", "4", "--max-total-tokens", "256"]
    log = tmp_path / "serve.log"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 900, process)  # healthy only once warm-up compiled every bucket
        warmed = _compiles(url)
        assert warmed > 0, log.read_text()[-3000:]

        def complete(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: one batch of mixed lengths
            served = list(pool.map(complete, PROMPTS))
        with futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: _mixed_request(url, i), range(64)))
        after = _compiles(url)
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert served == expected, log.read_text()[-3000:]
    assert after == warmed, f"serving compiled {after - warmed} XLA graph(s) after warm-up"
