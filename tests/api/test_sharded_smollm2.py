"""The embedded SmolLM2 (9 heads, 3 KV heads) served over 3 tensor-parallel ranks, as issue #14 asks:
token-identical greedy output to one rank in float32, for concurrent requests of mixed lengths."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures

import httpx
import pytest

from tests.api.conftest import free_port, wait_healthy
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "Write a haiku about the sea.\n",
           "List three prime numbers greater than one hundred, separated by commas, and explain how you know "
           "that each of them is prime without using a calculator:", "Hello"]
MAX_TOKENS = 12


@pytest.mark.slow
def test_smollm2_over_three_ranks_writes_the_tokens_of_one_rank(tmp_path) -> None:
    engine = Engine(EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=64 << 20, progress=False))
    prompts = [engine.tokenizer(p).input_ids for p in PROMPTS]
    one_rank = [outs[-1].generated_text for outs in engine.generate(
        prompts, SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True))]
    del engine

    port = free_port()
    command = [sys.executable, "-m", "tokenmill.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
               "--grpc-port", "0", "--dtype", "float32", "--kv-cache-bytes", str(64 << 20), "--num-shard", "3"]
    log = tmp_path / "serve.log"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 300, process)

        def complete(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: one batch of mixed lengths
            three_ranks = list(pool.map(complete, PROMPTS))
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert three_ranks == one_rank, log.read_text()[-3000:]
