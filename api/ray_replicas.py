"""Model-server replicas as Ray actors behind tokenmill's own router (`tokenmill serve --ray ADDRESS`).

Each replica is one actor whose process runs `tokenmill model-server` with the router's engine flags,
listening on its node's address at a port the system picks; the router adds that address to its set
and talks to it over the internal gRPC protocol as it would to a replica started by hand, so routing
(prefix-aware), health probes, failure isolation, metrics and the dashboard are the router's own.
An actor asks Ray for the resources the backend's `tokenmill_ray_resources` hook names (``GPU`` for the
GPU backends, ``CPU`` by default), so Ray places it on a node that has the device and hands the device
to it.

A small loop in the router (`RayReplicaPool.run`) resizes the set between `--min-replicas` and
`--max-replicas` as `tokenmill.api.autoscale` decides from the replicas' queue depth: it starts an actor
under a burst, and retires one after a quiet period by draining it first (no new requests, in-flight ones
finish), then stopping its server and its actor. An actor that dies (its node was removed, its process
killed) is dropped from the set as "lost": the router has already failed the requests it was streaming,
and the others go on; the loop then starts a replacement if the set fell below `--min-replicas`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from typing import Sequence

import ray
from ray.exceptions import RayError

from tokenmill.api.autoscale import Autoscaler, ScalingPolicy, SetState
from tokenmill.api.router import ReplicaRouter

logger = logging.getLogger(__name__)

NAMESPACE = "tokenmill"
# A replica that failed to start (a model that does not load, a node that went away) is retried after
# this long, doubling up to the maximum, instead of at every tick of the loop.
RETRY_S, MAX_RETRY_S = 2.0, 60.0


def replica_resources(backend: str | None, num_devices: int) -> dict[str, float]:
    """What one replica asks Ray for: the `tokenmill_ray_resources` answer of `backend`, else of the best
    backend here. The router's machine may lack the device, so the hook is asked without selecting it."""
    from tokenmill.registry import load_registry

    registry = load_registry()
    name = backend or registry.select().name
    return registry.subset_caller(name, "tokenmill_ray_resources")(num_devices=num_devices)


def actor_options(resources: dict[str, float]) -> dict:
    """Ray's actor options for `resources`: CPU and GPU have keywords of their own."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    # Threads: `serve` blocks one for the server's life; `address` and `stop` need others meanwhile.
    return dict(num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0), resources=custom,
                max_concurrency=4, max_restarts=0)


class ModelServerActor:
    """One model server in a Ray actor's process. `serve` runs it until `stop`; `address` waits until it
    listens and names it."""

    def __init__(self) -> None:
        self._address: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def serve(self, model_server_args: Sequence[str]) -> None:
        from tokenmill.api.grpc.model_server import run_model_server
        from tokenmill.cli import model_server_setup

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        listen = f"{ray.util.get_node_ip_address()}:0"
        try:
            config, model_id, grace_s = model_server_setup(["--listen", listen, *model_server_args])

            async def main() -> None:
                self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
                await run_model_server(config, listen, model_id, grace_s=grace_s, stop=self._stop,
                                       on_listening=self._address.set_result)

            asyncio.run(main())
        except BaseException as exc:
            if not self._address.done():
                self._address.set_exception(exc)
            raise

    def address(self) -> str:
        return self._address.result()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)


class RayReplicaPool:
    """The router's replicas as Ray actors, resized by the autoscaler."""

    def __init__(self, router: ReplicaRouter, policy: ScalingPolicy, model_server_args: Sequence[str],
                 resources: dict[str, float], interval_s: float = 1.0, drain_timeout_s: float = 30.0):
        self.router = router
        self.autoscaler = Autoscaler(policy)
        self.model_server_args = list(model_server_args)
        self.resources = resources
        self.interval_s = interval_s
        self.drain_timeout_s = drain_timeout_s
        self._actor_class = ray.remote(**actor_options(resources))(ModelServerActor)
        self._actors: dict[str, ray.actor.ActorHandle] = {}  # in the router's set, by address
        self._all: set[ray.actor.ActorHandle] = set()  # every actor not yet killed, starting ones included
        self._starting = 0
        self._retry_s = RETRY_S
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    async def start(self, address: str) -> None:
        """Join the Ray cluster at `address` and start the autoscaler loop (which starts the first replicas)."""
        await asyncio.to_thread(ray.init, address=address, namespace=NAMESPACE, log_to_driver=False)
        logger.info("on Ray at %s: replicas ask for %s", address, self.resources)
        self._loop_task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for actor in list(self._all):
            with contextlib.suppress(RayError):
                ray.kill(actor)
        self._all.clear()
        await asyncio.to_thread(ray.shutdown)

    async def run(self) -> None:
        while True:
            self.tick(time.monotonic())
            await asyncio.sleep(self.interval_s)

    def tick(self, now: float) -> None:
        serving = [r for r in self.router.replicas if not r.draining]
        queued = sum(r.info.num_waiting for r in serving if r.healthy and r.info is not None)
        decision = self.autoscaler.decide(now, SetState(len(serving), self._starting, queued))
        if decision > 0:
            logger.info("%d request(s) queued on %d replica(s) (%d starting): starting one", queued, len(serving),
                        self._starting)
            self._spawn(self._run_replica())
        elif decision < 0:
            retired = min(serving, key=lambda r: (r.in_flight, r.num_requests))
            logger.info("queues empty for %.0f s: retiring %s", self.autoscaler.policy.scale_down_delay_s,
                        retired.address)
            self._spawn(self._retire(retired.address))

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_replica(self) -> None:
        """Start an actor, put its server in the router's set, and take it out if the actor dies."""
        actor = self._actor_class.remote()
        self._all.add(actor)
        serving = actor.serve.remote(self.model_server_args)
        self._starting += 1
        try:
            address = await actor.address.remote()
        except RayError as exc:
            logger.error("a model-server actor failed to start (retrying in %.0f s): %s", self._retry_s, exc)
            self._forget(actor)
            await asyncio.sleep(self._retry_s)  # still counted as starting: the autoscaler waits too
            self._retry_s = min(MAX_RETRY_S, self._retry_s * 2)
            return
        finally:
            self._starting -= 1
        self._retry_s = RETRY_S
        self._actors[address] = actor
        self.router.add_replica(address)
        try:
            await serving
        except RayError as exc:
            if self._actors.pop(address, None) is not None:  # not retired: it died
                logger.warning("model server %s is gone: %s", address, exc)
                await self.router.remove_replica(address, "lost", f"its Ray actor died ({_why(exc)})")
        self._forget(actor)

    async def _retire(self, address: str) -> None:
        await self.router.drain(address, self.drain_timeout_s)
        actor = self._actors.pop(address, None)
        if actor is None:  # died while draining: already dropped as lost
            return
        await self.router.remove_replica(address, "removed")
        with contextlib.suppress(RayError):
            await actor.stop.remote()  # its `serve` call returns once the server has stopped

    def _forget(self, actor) -> None:
        with contextlib.suppress(RayError):
            ray.kill(actor)
        self._all.discard(actor)


def _why(exc: BaseException) -> str:
    """The line of Ray's death notice (a dozen lines) that says why, e.g. that the actor's node died."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "because" in line), lines[0] if lines else type(exc).__name__)
