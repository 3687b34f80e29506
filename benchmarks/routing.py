"""`make bench`'s routing section: prefix-aware against least-loaded routing over 2 model-server replicas.

Two `tokenmill model-server` processes serve the embedded SmolLM2, one core each, and two routers
(`tokenmill serve --model-server A --model-server B`) front both, one with `--routing prefix` and one with
`--routing least-loaded`, so the replicas are shared and only the routing differs. A run sends 64 streamed
chat requests, 8 clients at a time: 8 distinct system prompts of a few hundred tokens, each with 8
questions, shuffled. Each run's system prompts open with a marker of their own, so no run finds another's
prefixes in the caches. Per run: the prefix-cache hit rate (prompt tokens the replicas served from their
caches over all prompt tokens, from the router's `vllm:prefix_cache_*` counters) and TTFT p50 (client side).
The modes alternate within a pass and the report gives medians over passes, side by side with ratios.

Each replica's KV cache is `REPLICA_KV_CACHE_BYTES`: room for the requests in flight and about half of the
system prompts, as a serving replica's cache is full in practice. With the default budget (512 MiB here)
every replica would keep every system prompt once it had seen it, and routing could only save the first
prefill of each prompt on each replica.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load import client_session, stream_chat
from benchmarks.prompts import _PARAGRAPH, SHORT_PROMPTS
from benchmarks.servers import RunningServer, ServerSpec, free_port
from benchmarks.stats import percentile

MODES = ("prefix", "least-loaded")
SYSTEM_PROMPTS = 8
REQUESTS = 64
CONCURRENCY = 8
MAX_TOKENS = 16
# SmolLM2 caches 22.5 KiB a token (30 layers, 3 kv heads of 64, k and v, bf16): 64 MiB hold about 2,900
# tokens, a replica's 4 to 6 requests in flight (about 400 tokens each) and 3 or 4 of the 8 system prompts.
REPLICA_KV_CACHE_BYTES = 64 << 20
ROLES = ["a travel agent", "a chemistry tutor", "a museum guide", "a tax adviser", "a chess coach",
         "a ship's navigator", "a bakery owner", "a park ranger"]


def system_prompt(run: int, index: int) -> str:
    """A distinct system prompt of about 350 tokens, opening with this run's marker."""
    return (f"[run {run}, desk {index}] You are {ROLES[index]}. Answer briefly and politely, and stay in "
            f"character as {ROLES[index]} whatever the question. Background you may draw on:\n\n"
            + _PARAGRAPH * 3)


def workload(run: int, seed: int = 0) -> list[tuple[str, str]]:
    """(system prompt, question) pairs: every system prompt with every question, shuffled."""
    pairs = [(system_prompt(run, s), SHORT_PROMPTS[q % len(SHORT_PROMPTS)])
             for s in range(SYSTEM_PROMPTS) for q in range(REQUESTS // SYSTEM_PROMPTS)]
    random.Random(seed).shuffle(pairs)
    return pairs


def _counters(url: str) -> dict[str, float]:
    """The router's prefix-cache and routing counters, summed over labels."""
    wanted = {"vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "tokenmill_router_prefix_lookups",
              "tokenmill_router_prefix_hits"}
    totals = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name in wanted:
            totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


async def _drive(url: str, pairs: list[tuple[str, str]]) -> list:
    queue = iter(pairs)
    records = []

    async def client(session) -> None:
        for system, question in queue:
            records.append(await stream_chat(session, f"{url}/v1/chat/completions", "tokenmill", question, system,
                                             MAX_TOKENS))

    async with client_session(CONCURRENCY) as session:
        await asyncio.gather(*(client(session) for _ in range(CONCURRENCY)))
    return records


def run_once(router: RunningServer, run: int) -> dict:
    before = _counters(router.base_url)
    records = asyncio.run(_drive(router.base_url, workload(run)))
    time.sleep(1.5)  # the router refreshes its routing counters with each health round (every second)
    after = _counters(router.base_url)
    delta = {name: after[name] - before[name] for name in after}
    ok = [r for r in records if r.ok]
    lookups = delta["tokenmill_router_prefix_lookups"]
    return {"errors": len(records) - len(ok),
            "prefix_cache_hit_rate": delta["vllm:prefix_cache_hits"] / max(1.0, delta["vllm:prefix_cache_queries"]),
            "ttft_p50_s": percentile([r.ttft for r in ok], 50),
            "routed_to_prefix_owner": delta["tokenmill_router_prefix_hits"] / lookups if lookups else None}


def _start_replicas(log_dir: Path) -> tuple[list[str], list[subprocess.Popen]]:
    tokenmill = str(Path(sys.executable).parent / "tokenmill")
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    processes = [subprocess.Popen([tokenmill, "model-server", "--listen", address, "--cpu-bind", str(core),
                                   "--kv-cache-bytes", str(REPLICA_KV_CACHE_BYTES)],
                                  stdout=open(log_dir / f"routing-replica{core}.log", "ab"), stderr=subprocess.STDOUT)
                 for core, address in enumerate(addresses)]
    return addresses, processes


def _router_spec(mode: str, addresses: list[str]) -> ServerSpec:
    port = free_port()
    command = [str(Path(sys.executable).parent / "tokenmill"), "serve", "--hostname", "127.0.0.1", "--port",
               str(port), "--grpc-port", "0", "--routing", mode]
    for address in addresses:
        command += ["--model-server", address]
    return ServerSpec(name=f"router-{mode}", command=command, model="tokenmill", port=port)


def _wait_both_replicas(router: RunningServer, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{router.base_url}/metrics", timeout=10).text
        healthy = [line for line in text.splitlines() if line.startswith("tokenmill_replica_healthy{")]
        if len(healthy) == 2 and all(line.endswith(" 1.0") for line in healthy):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{router.spec.name}: both model servers were not healthy within {timeout_s:.0f} s")


def run(passes: int, log_dir: Path | None = None) -> dict:
    log_dir = log_dir or Path.home() / ".cache" / "tokenmill-bench" / "logs" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    addresses, replicas = _start_replicas(log_dir)
    routers: dict[str, RunningServer] = {}
    try:
        for mode in MODES:
            routers[mode] = RunningServer(_router_spec(mode, addresses), log_dir)
            _wait_both_replicas(routers[mode])
        figures: dict[str, list[dict]] = {mode: [] for mode in MODES}
        run_id = 0
        for index in range(passes):
            for mode in (MODES if index % 2 == 0 else MODES[::-1]):
                run_id += 1
                figures[mode].append(run_once(routers[mode], run_id))
                print(f"    routing {mode:>12}: hit rate {figures[mode][-1]['prefix_cache_hit_rate']:.1%}, "
                      f"TTFT p50 {figures[mode][-1]['ttft_p50_s'] or 0:.3f} s", flush=True)
    finally:
        for router in routers.values():
            router.stop()
        for process in replicas:
            process.terminate()
        for process in replicas:
            process.wait(timeout=60)
    return {"replicas": 2, "requests": REQUESTS, "system_prompts": SYSTEM_PROMPTS, "concurrency": CONCURRENCY,
            "max_tokens": MAX_TOKENS, "passes": passes,
            "modes": {mode: {"prefix_cache_hit_rate": statistics.median(r["prefix_cache_hit_rate"] for r in runs),
                             "ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in runs),
                             "errors": sum(r["errors"] for r in runs)} for mode, runs in figures.items()},
            "all_passes": figures}


def report_lines(results: dict) -> list[str]:
    prefix, load = results["modes"]["prefix"], results["modes"]["least-loaded"]
    return ["## Routing: prefix-aware against least-loaded, 2 replicas", "",
            f"{results['requests']} streamed chat requests, {results['concurrency']} at a time, over "
            f"{results['system_prompts']} system prompts of about 350 tokens, {results['max_tokens']} new tokens "
            f"each; 2 model-server replicas of the embedded SmolLM2 on one core each with "
            f"{REPLICA_KV_CACHE_BYTES >> 20} MiB of KV cache, one router per mode "
            f"(`benchmarks/routing.py`), {results['passes']} pass(es), medians. Hit rate: prompt tokens served "
            "from the replicas' prefix caches over all prompt tokens.", "",
            "| routing | prefix-cache hit rate | TTFT p50 | errors |", "|---|---|---|---|",
            f"| least-loaded | {load['prefix_cache_hit_rate']:.1%} | {1000 * load['ttft_p50_s']:.0f} ms | "
            f"{load['errors']} |",
            f"| prefix | {prefix['prefix_cache_hit_rate']:.1%} | {1000 * prefix['ttft_p50_s']:.0f} ms | "
            f"{prefix['errors']} |",
            f"| ratio prefix / least-loaded | {prefix['prefix_cache_hit_rate'] / load['prefix_cache_hit_rate']:.2f}× "
            f"| {prefix['ttft_p50_s'] / load['ttft_p50_s']:.2f}× | |", ""]


if __name__ == "__main__":  # the section alone: python -m benchmarks.routing [passes]
    import json

    figures = run(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(json.dumps(figures, indent=2))
    print("\n".join(report_lines(figures)))
