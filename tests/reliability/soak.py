"""The soak: many concurrent streaming clients against `tokenmill serve` for a while, then the books.

`python -m tests.reliability.soak --minutes 10 --clients 200` (`make soak`) runs the long form; the
test suite runs a short one. The server is `tokenmill serve` in a subprocess (launcher, router and model
server, as deployed) on the tiny random Llama: the embedded SmolLM2 does not sustain 200 streams on
2 cores. Each client streams requests of mixed lengths and seeds and, one time in eight, hangs up
mid-way on purpose. It checks, and prints: every finished stream's tokens concatenate to its final
`generated_text`; no error but the deliberate cancellations; RSS of the server's process tree after
the drain within 5 % of RSS after warm-up; `tokenmill_kv_cache_usage_ratio` 0 after the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.api.conftest import CHAT_TEMPLATE, free_port, wait_healthy
from tests.tiny_models import build_tiny, tiny_tokenizer

RSS_TOLERANCE = 0.05
CANCEL_ONE_IN = 8


@dataclass
class Tally:
    finished: int = 0
    cancelled: int = 0
    corrupted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _save_tiny(folder: Path) -> None:
    build_tiny("llama").reference.save_pretrained(folder, safe_serialization=True)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def _tree_rss(process: psutil.Process) -> int:
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


async def _one_stream(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    cancel_after = rng.randint(1, 8) if rng.randrange(CANCEL_ONE_IN) == 0 else None
    body = {"inputs": " ".join(rng.choices(["w5", "w6", "w7", "w8"], k=rng.randint(1, 40))),
            "parameters": {"max_new_tokens": rng.randint(4, 96), "do_sample": rng.random() < 0.7,
                           "seed": rng.randrange(1 << 32)}}
    tokens, final, seen = [], None, 0
    try:
        async with client.stream("POST", "/generate_stream", json=body) as response:
            if response.status_code != 200:
                tally.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    tally.errors.append(f"in-band: {event}")
                    return
                tokens.append(event["token"]["text"])
                final = event["generated_text"]
                seen += 1
                if cancel_after is not None and seen == cancel_after and final is None:
                    tally.cancelled += 1
                    return  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as exc:
        tally.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if final is None:
        tally.errors.append("stream ended without its final event")
    elif "".join(tokens) != final:
        tally.corrupted.append(f"{''.join(tokens)!r} != {final!r}")
    else:
        tally.finished += 1


async def _client(url: str, seed: int, deadline: float, max_requests: int, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for _ in range(max_requests):  # bounded in count as well as in time
            if time.monotonic() >= deadline:
                return
            await _one_stream(client, rng, tally)


async def _load(url: str, clients: int, seconds: float, max_requests: int, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(_client(url, seed, deadline, max_requests, tally) for seed in range(clients)))


def _kv_usage(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("tokenmill_kv_cache_usage_ratio "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no tokenmill_kv_cache_usage_ratio")


def _settled(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def soak(minutes: float, clients: int, max_requests_per_client: int = 100_000) -> dict:
    """Run the soak; return its figures (the caller asserts on them)."""
    with tempfile.TemporaryDirectory() as folder:
        _save_tiny(Path(folder))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
             "--grpc-port", "0", "--model-id", folder, "--dtype", "float32", "--kv-cache-bytes", str(16 << 20),
             "--max-concurrent-requests", str(clients + 16)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(url, 180, server)
            process = psutil.Process(server.pid)
            warm_up = Tally()
            asyncio.run(_load(url, clients, min(20.0, 60 * minutes / 4), 5, warm_up))
            rss_warm = _tree_rss(process)
            tally = Tally()
            started = time.monotonic()
            asyncio.run(_load(url, clients, 60 * minutes, max_requests_per_client, tally))
            elapsed = time.monotonic() - started
            drained = _settled(lambda: _kv_usage(url) == 0.0, 15)
            rss_drained = _tree_rss(process)
        finally:
            server.terminate()
            server.wait(timeout=60)
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": tally.finished + tally.cancelled,
            "finished": tally.finished, "cancelled": tally.cancelled, "corrupted": tally.corrupted,
            "errors": tally.errors + warm_up.errors, "rss_warm_mb": round(rss_warm / 2**20, 1),
            "rss_drained_mb": round(rss_drained / 2**20, 1), "rss_change": round(rss_drained / rss_warm - 1, 4),
            "kv_free_after_drain": drained}


def check(figures: dict) -> list[str]:
    """What is wrong with a soak's figures; empty when it passed."""
    problems = []
    if figures["corrupted"]:
        problems.append(f"{len(figures['corrupted'])} corrupted stream(s), first: {figures['corrupted'][0]}")
    if figures["errors"]:
        problems.append(f"{len(figures['errors'])} error(s), first: {figures['errors'][0]}")
    if abs(figures["rss_change"]) > RSS_TOLERANCE:
        problems.append(f"RSS moved {figures['rss_change']:+.1%} from warm-up to drain")
    if not figures["kv_free_after_drain"]:
        problems.append("KV blocks still in use after the drain")
    if not figures["finished"] or not figures["cancelled"]:
        problems.append("the soak finished no stream, or cancelled none")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=200)
    args = parser.parse_args()
    figures = soak(args.minutes, args.clients)
    problems = check(figures)
    print(json.dumps({**figures, "corrupted": len(figures["corrupted"]), "errors": figures["errors"][:5]}, indent=2))
    print("soak passed" if not problems else "soak FAILED:\n  " + "\n  ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
