"""A small OpenAI-compatible load generator: streaming chat requests, closed-loop or open-loop (Poisson).

Hand-written rather than guidellm: every figure the report needs (TTFT, inter-token gaps, end-to-end
latency, tokens per second) falls out of the timestamps of one streamed response, guidellm pulls in a
large dependency tree, and a client this small costs the shared 2 cores little.
"""

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import aiohttp

from benchmarks.prompts import PROMPTS

OUTPUT_TOKENS = 128


@dataclass
class RequestRecord:
    """Timestamps of one streamed response, relative to when the request was sent."""

    ok: bool = False
    error: str | None = None
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)  # one entry per chunk that carried text
    output_tokens: int = 0
    finished: float = 0.0

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def latency(self) -> float:
        return self.finished - self.sent

    @property
    def inter_token_gaps(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:])]


def chat_body(model: str, prompt: str, system: str | None = None, max_tokens: int = OUTPUT_TOKENS) -> dict:
    messages = [{"role": "system", "content": system}] if system is not None else []
    return {
        "model": model,
        "messages": messages + [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_chat(session: aiohttp.ClientSession, url: str, model: str, prompt: str, system: str | None = None,
                      max_tokens: int = OUTPUT_TOKENS) -> RequestRecord:
    record = RequestRecord(sent=time.perf_counter())
    try:
        async with session.post(url, json=chat_body(model, prompt, system, max_tokens)) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return record
            chunks = 0
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        record.token_times.append(time.perf_counter())
                        chunks += 1
                usage = event.get("usage")
                if usage:
                    record.output_tokens = usage.get("completion_tokens", 0)
            record.output_tokens = record.output_tokens or chunks
            record.ok = bool(record.token_times)
            if not record.ok:
                record.error = "no tokens streamed"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.finished = time.perf_counter()
    return record


def client_session(limit: int) -> aiohttp.ClientSession:
    # A fresh connection per request: llama-server closes idle keep-alive connections after a few
    # seconds, and a request written to one that was just closed fails before the server sees it.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit + 4, force_close=True),
        timeout=aiohttp.ClientTimeout(total=1800),
    )


async def closed_loop(base_url: str, model: str, concurrency: int, total_requests: int
                      ) -> tuple[list[RequestRecord], float]:
    """`concurrency` clients, each sending its next request as soon as the last one ends."""
    turns = [(PROMPTS[index % len(PROMPTS)], None, OUTPUT_TOKENS) for index in range(total_requests)]
    return await closed_loop_turns(base_url, model, concurrency, turns)


async def closed_loop_turns(base_url: str, model: str, concurrency: int,
                            turns: list[tuple[str, str | None, int]]) -> tuple[list[RequestRecord], float]:
    """`concurrency` clients working through (prompt, system prompt or None, max_tokens) turns in order."""
    url = f"{base_url}/v1/chat/completions"
    records: list[RequestRecord] = []
    queue = iter(turns)

    async def client(session: aiohttp.ClientSession) -> None:
        for prompt, system, max_tokens in queue:
            records.append(await stream_chat(session, url, model, prompt, system, max_tokens))

    async with client_session(concurrency) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return records, time.perf_counter() - start


async def open_loop(base_url: str, model: str, rate: float, total_requests: int, seed: int = 0
                    ) -> tuple[list[RequestRecord], float]:
    """Requests arriving as a Poisson process of `rate` per second, whatever the server's pace."""
    url = f"{base_url}/v1/chat/completions"
    gaps = random.Random(seed)
    async with client_session(total_requests) as session:
        start = time.perf_counter()
        tasks = []
        for index in range(total_requests):
            tasks.append(asyncio.create_task(stream_chat(session, url, model, PROMPTS[index % len(PROMPTS)])))
            await asyncio.sleep(gaps.expovariate(rate))
        records = await asyncio.gather(*tasks)
        return list(records), time.perf_counter() - start


async def replay(base_url: str, model: str, turns: list[tuple[str, str | None, int]], send_at: list[float]
                 ) -> tuple[list[RequestRecord], float]:
    """Open loop on a schedule: turn i is sent `send_at[i]` seconds after the start, whatever the server's
    pace (each waits for its own time, so a slow send never delays the next). Returns the records in
    the turns' order and the time from the start until the last response ended."""
    url = f"{base_url}/v1/chat/completions"
    async with client_session(len(turns)) as session:
        start = time.perf_counter()

        async def send(turn: tuple[str, str | None, int], at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            prompt, system, max_tokens = turn
            return await stream_chat(session, url, model, prompt, system, max_tokens)

        records = await asyncio.gather(*(send(turn, at) for turn, at in zip(turns, send_at)))
        return list(records), time.perf_counter() - start
