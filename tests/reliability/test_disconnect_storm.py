"""Disconnect storms: many clients leave at once, mid-stream or by timing out; nothing they asked for
stays behind, and the streams that were not cut are whole.

64 concurrent streams, half cut after a few events (TGI and OpenAI routes), plus non-streaming clients
whose httpx timeout fires while their request runs. Afterwards the batch is empty and every KV block
free within 5 s, and every uncut stream's tokens concatenate to its final `generated_text`.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.reliability.conftest import TinyServer, assert_drained

STREAMS = 64
TIMED_OUT = 16
# ignore_eos keeps the cut and timed-out requests running: they cannot end on their own before the client leaves.
LONG = 900


@pytest.fixture(scope="module")
def server():
    server = TinyServer(max_concurrent_requests=STREAMS + TIMED_OUT + 8)
    yield server
    server.stop()


async def _events(response: httpx.Response):
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data = line[len("data:"):].strip()
            yield data if data == "[DONE]" else json.loads(data)


async def _whole_stream(client: httpx.AsyncClient, seed: int) -> tuple[str, str]:
    """A TGI stream read to its end: (concatenated token texts, final generated_text)."""
    body = {"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": random.Random(seed).randint(8, 80),
                                                 "do_sample": True, "seed": seed}}
    tokens, final = [], None
    async with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        async for event in _events(response):
            assert "error" not in event, event
            tokens.append(event["token"]["text"])
            final = event["generated_text"]
    assert final is not None, "the stream ended without its final event"
    return "".join(tokens), final


async def _cut_stream(client: httpx.AsyncClient, index: int) -> bool:
    """Read a few events of a long stream, then close the connection; True if it was cut before its end."""
    after = 1 + index % 5
    if index % 2:
        path, body = "/v1/completions", {"prompt": "w5 w6", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    else:
        path, body = "/generate_stream", {"inputs": "w5 w6", "parameters": {"max_new_tokens": LONG}}
    seen = 0
    async with client.stream("POST", path, json=body) as response:
        async for event in _events(response):
            if event == "[DONE]" or event.get("generated_text") is not None:
                return False
            seen += 1
            if seen == after:
                return True  # leaving the block closes the connection mid-stream
    return False


async def _timed_out(url: str, index: int) -> bool:
    """A non-streaming request whose client gives up first; True if the timeout fired."""
    if index % 2:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_tokens": LONG,
                                              "ignore_eos": True, "n": 2}
    else:
        path, body = "/v1/completions", {"prompt": "w5 w6", "max_tokens": LONG, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=0.2 + 0.05 * (index % 4)) as client:
        try:
            await client.post(path, json=body)
        except httpx.TimeoutException:
            return True
    return False


async def _storm(url: str):
    limits = httpx.Limits(max_connections=STREAMS + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        whole = [_whole_stream(client, seed) for seed in range(STREAMS // 2)]
        cut = [_cut_stream(client, i) for i in range(STREAMS // 2)]
        timed_out = [_timed_out(url, i) for i in range(TIMED_OUT)]
        results = await asyncio.gather(*whole, *cut, *timed_out)
    n = STREAMS // 2
    return results[:n], results[n:2 * n], results[2 * n:]


@pytest.mark.timeout(300)
def test_a_storm_of_disconnects_leaves_nothing_behind(server) -> None:
    whole, cut, timed_out = asyncio.run(_storm(server.url))
    assert sum(cut) == len(cut), "every cut stream was left mid-way (ignore_eos or 900 tokens keep them long)"
    assert sum(timed_out) == len(timed_out), "every non-streaming client timed out while its request ran"
    for tokens, final in whole:
        assert tokens == final
    assert_drained(server, timeout_s=5)
    # The server still serves after the storm.
    answer = httpx.post(f"{server.url}/generate", json={"inputs": "w5", "parameters": {"max_new_tokens": 4}}, timeout=60)
    assert answer.status_code == 200
    assert_drained(server, timeout_s=5)
