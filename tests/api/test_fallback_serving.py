"""The HTTP server on an architecture only the transformers fallback runs: concurrent requests get
transformers' greedy tokens, and /info says whose code runs the model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.conftest import TinyServer
from tests.fallback_models import build_fallback_tiny

NEW_TOKENS = 8
PROMPTS = ["w5 w6 w7 w8", "w9 w4 w7 w7 w6 w5 w8 w9 w4", "w4"]


@pytest.fixture(scope="module")
def neox_server():
    tiny = build_fallback_tiny("gpt_neox")
    server = TinyServer(tiny=tiny, max_concurrent_requests=4)
    yield tiny, server
    server.stop()


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_concurrent_requests_match_transformers_greedy(neox_server) -> None:
    tiny, server = neox_server
    prompt_ids = [server.engine.tokenizer(p).input_ids for p in PROMPTS]
    expected = [_until_eos(tiny.greedy(ids, NEW_TOKENS), tiny.config.eos_token_id) for ids in prompt_ids]

    def generate(prompt: str) -> list[int]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
        response = httpx.post(f"{server.url}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["details"]["tokens"]]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(generate, PROMPTS)) == expected
    assert httpx.get(f"{server.url}/info").json()["model_implementation"] == "transformers"


def test_info_behind_tokenmill_serve_names_our_own_implementation(served_smollm2) -> None:
    # The router learns it from the model server's Info; SmolLM2 is a Llama, one of ours.
    assert httpx.get(f"{served_smollm2}/info").json()["model_implementation"] == "tokenmill"
