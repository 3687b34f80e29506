"""The router's health probes: a replica slow to answer one probe is busy, not gone; a run of
unanswered probes, or a refused connection, takes it out (the soak on an overloaded machine had a
single replica declared unhealthy by one late probe, and every request meanwhile refused)."""

from __future__ import annotations

import asyncio

from tests.reliability.conftest import model_server, tiny_engine
from tokenmill.api.grpc.model_server import ModelServerServicer
from tokenmill.api.router import SLOW_PROBES_TO_UNHEALTHY, ReplicaRouter

PROBE_TIMEOUT_S = 0.2


class SlowInfo(ModelServerServicer):
    """The real servicer, with its Info answers held back by `delay_s` (a busy replica)."""

    delay_s = 0.0

    async def Info(self, request, context):
        await asyncio.sleep(self.delay_s)
        return await super().Info(request, context)


async def _health_over_probes() -> tuple[list[bool], bool, bool]:
    async with model_server(tiny_engine(), SlowInfo) as (address, servicer):
        router = ReplicaRouter([address], probe_timeout_s=PROBE_TIMEOUT_S)
        replica = router.replicas[0]
        try:
            await router.wait_ready(30)
            servicer.delay_s = 3 * PROBE_TIMEOUT_S
            while_slow = []
            for _ in range(SLOW_PROBES_TO_UNHEALTHY):
                await router.check_health()
                while_slow.append(replica.healthy)
            servicer.delay_s = 0.0
            # The first answered probe brings it back. On a loaded machine (CI's two cores) an answer can still
            # miss the 0.2 s deadline, so a few probes are allowed: a replica that never recovers fails them all.
            for _ in range(10):
                await router.check_health()
                if replica.healthy:
                    break
            recovered = replica.healthy
        finally:
            stop = router.stop
    await router.check_health()  # the server is gone: the connection is refused
    gone = replica.healthy
    await stop()
    return while_slow, recovered, gone


def test_only_a_run_of_late_probes_or_a_refused_connection_makes_a_replica_unhealthy() -> None:
    while_slow, recovered, gone = asyncio.run(_health_over_probes())
    assert while_slow == [True] * (SLOW_PROBES_TO_UNHEALTHY - 1) + [False]
    assert recovered
    assert not gone
