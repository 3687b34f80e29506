"""Prefix-aware routing: requests sharing a prompt prefix go to one replica unless it is overloaded, and
that replica's prefix cache serves the prefix (issue #19)."""

from __future__ import annotations

import asyncio
import random

from tests.reliability.conftest import model_server, tiny_engine
from tokenmill.api.grpc import model_server_pb2 as pb
from tokenmill.api.metrics import Metrics
from tokenmill.api.router import ReplicaRouter
from tokenmill.api.routing import PrefixAffinity, RoutingPolicy
from tokenmill.sampling_params import SamplingParams

BLOCK = 4  # the prefix-cache block size the routing-choice tests' replicas report
UNREACHABLE = ("127.0.0.1:9", "127.0.0.1:7")  # discard and echo: nothing listens; probes fail at once


def _prompt(prefix: int, tail: int, prefix_blocks: int = 3) -> list[int]:
    """Prefix number `prefix` (`prefix_blocks` full blocks) then a tail of its own."""
    return [100 + prefix] * (BLOCK * prefix_blocks) + [200 + tail, 201, 202]


def _routed(router: ReplicaRouter, prompt: list[int]) -> str:
    """Pick the replica for `prompt` as `generate` does and hold the request there (in flight)."""
    replica = router.pick(prefix_hashes=router.prefix_hashes(prompt, None))
    replica.in_flight += 1
    replica.num_requests += 1
    return replica.address


def _routing_choice(test, policy: RoutingPolicy = RoutingPolicy("prefix", max_imbalance=4)) -> None:
    """Run `test(router)` on a router whose two replicas report themselves ready with a prefix cache."""

    async def run() -> None:
        router = ReplicaRouter(UNREACHABLE, policy=policy)
        for replica in router.replicas:
            replica.healthy = True
            replica.info = pb.InfoResponse(ready=True, prefix_cache_block_size=BLOCK)
        try:
            await test(router)
        finally:
            await router.stop()

    asyncio.run(run())


def test_requests_sharing_a_prefix_go_to_one_replica_and_prefixes_spread() -> None:
    async def test(router: ReplicaRouter) -> None:
        landed = {0: set(), 1: set()}
        for i in range(8):  # two prefixes, interleaved, every request still in flight
            for prefix in (0, 1):
                landed[prefix].add(_routed(router, _prompt(prefix, i)))
        assert all(len(addresses) == 1 for addresses in landed.values()), landed
        assert landed[0] != landed[1]  # the second prefix went to the less loaded replica
        assert (router.prefix_lookups, router.prefix_hits) == (16, 14)

    _routing_choice(test)


def test_an_overloaded_prefix_replica_falls_back_to_the_least_loaded() -> None:
    async def test(router: ReplicaRouter) -> None:
        first, second = (r.address for r in router.replicas)
        # One prefix, requests held: its replica takes them until it has 2 more in flight than the other.
        assert [_routed(router, _prompt(0, i)) for i in range(4)] == [first, first, first, second]
        assert (router.prefix_lookups, router.prefix_hits) == (4, 2)

    _routing_choice(test, RoutingPolicy("prefix", max_imbalance=2))


def test_the_longest_known_prefix_wins_and_a_prompt_without_a_full_block_goes_by_load() -> None:
    async def test(router: ReplicaRouter) -> None:
        first, second = router.replicas
        assert _routed(router, _prompt(0, 0, prefix_blocks=1)) == first.address  # its first block: on the first
        two_blocks = router.prefix_hashes(_prompt(0, 1, prefix_blocks=3), None)[1]
        router.affinity.remember([two_blocks], second.address)  # its first two blocks: on the second
        second.in_flight += 3  # busier, within the imbalance allowed
        assert _routed(router, _prompt(0, 2, prefix_blocks=3)) == second.address
        assert router.prefix_hashes([1, 2, 3, 4], None) == []  # the last token is never cached: no full block
        assert _routed(router, [1, 2, 3, 4]) == first.address

    _routing_choice(test)


def test_an_unhealthy_replica_is_forgotten() -> None:
    async def test(router: ReplicaRouter) -> None:
        first = _routed(router, _prompt(0, 0))
        assert router.affinity.owner(router.prefix_hashes(_prompt(0, 1), None)) == first
        await router.check_health()  # nothing listens: both turn unhealthy
        assert len(router.affinity) == 0

    _routing_choice(test)


def test_least_loaded_routing_ignores_prefixes() -> None:
    async def test(router: ReplicaRouter) -> None:
        assert router.prefix_hashes(_prompt(0, 0), None) == []
        assert [_routed(router, _prompt(0, i)) for i in range(4)] == list(UNREACHABLE) * 2

    _routing_choice(test, RoutingPolicy("least-loaded"))


def test_the_prefix_map_is_a_bounded_lru() -> None:
    affinity = PrefixAffinity(capacity=3)
    affinity.remember([b"a", b"b"], "r0")
    affinity.remember([b"c"], "r1")
    affinity.remember([b"a"], "r1")  # refreshed: "b" is now the oldest
    affinity.remember([b"d"], "r0")
    assert len(affinity) == 3 and affinity.owner([b"b"]) is None
    assert affinity.owner([b"a", b"zz"]) == "r1" and affinity.owner([b"d"]) == "r0"


# End to end: two in-process model servers behind the router, a shared system prompt per conversation.

SYSTEM_PROMPTS = 3
REQUESTS_PER_PROMPT = 4
SYSTEM_TOKENS = 64  # four full blocks of the tiny engine (16 tokens a block)


def _workload() -> list[tuple[int, list[int]]]:
    """(system prompt, prompt) pairs: each system prompt followed by a question of its own, shuffled."""
    rng = random.Random(0)
    systems = [[rng.randrange(5, 250) for _ in range(SYSTEM_TOKENS)] for _ in range(SYSTEM_PROMPTS)]
    pairs = [(s, systems[s] + [rng.randrange(5, 250) for _ in range(rng.randrange(3, 12))])
             for s in range(SYSTEM_PROMPTS) for _ in range(REQUESTS_PER_PROMPT)]
    rng.shuffle(pairs)
    return pairs


async def _serve_workload(mode: str) -> tuple[dict[int, set[str]], float, str]:
    """The replicas each system prompt's requests landed on, the replicas' prefix-cache hit rate (prompt
    tokens served from their caches over those looked up), and the router's /metrics text; requests sent
    one after another."""
    engines = [tiny_engine(), tiny_engine()]
    async with model_server(engines[0]) as (first, _), model_server(engines[1]) as (second, _):
        router = ReplicaRouter([first, second], policy=RoutingPolicy(mode))
        try:
            await router.wait_ready(30)  # both replicas probed, both ready
            landed: dict[int, set[str]] = {s: set() for s in range(SYSTEM_PROMPTS)}
            for i, (system, prompt) in enumerate(_workload()):
                before = [r.num_requests for r in router.replicas]
                async for _ in router.generate(f"r{i}", prompt, SamplingParams(max_new_tokens=2, ignore_eos=True)):
                    pass
                landed[system].update(r.address for r, n in zip(router.replicas, before) if r.num_requests > n)
            metrics = Metrics()
            metrics.observe_replicas(router)
            blocks = [engine.block_manager for engine in engines]
            hit_rate = sum(b.prefix_hits for b in blocks) / sum(b.prefix_queries for b in blocks)
            return landed, hit_rate, metrics.render().decode()
        finally:
            await router.stop()


def test_a_shared_system_prompt_lands_on_one_replica_whose_prefix_cache_serves_it() -> None:
    by_prefix, prefix_hit_rate, text = asyncio.run(_serve_workload("prefix"))
    by_load, load_hit_rate, _ = asyncio.run(_serve_workload("least-loaded"))
    assert all(len(replicas) == 1 for replicas in by_prefix.values()), by_prefix
    assert len(set.union(*by_prefix.values())) == 2  # the system prompts still spread over both replicas
    assert any(len(replicas) == 2 for replicas in by_load.values()), by_load  # load alone splits a prompt
    assert prefix_hit_rate > load_hit_rate, (prefix_hit_rate, load_hit_rate)
    requests = SYSTEM_PROMPTS * REQUESTS_PER_PROMPT
    assert f"tokenmill_router_prefix_lookups_total {float(requests)}" in text
    assert f"tokenmill_router_prefix_hits_total {float(requests - SYSTEM_PROMPTS)}" in text
