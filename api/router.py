"""The router's client of its model-server replicas: prefix-aware or least-loaded choice, health, failure isolation.

`ReplicaRouter.generate` has the in-process `AsyncEngine.generate` signature, so the HTTP and gRPC
front ends do not know whether the engine is local or behind the internal gRPC protocol.

Prefix-aware routing (the default) sends a prompt to the replica that last served its longest known
prefix, the one whose prefix cache may still hold those KV blocks, unless that replica has more than
`max_imbalance` requests in flight beyond the least-loaded one; then, and for a prefix never seen, the
least-loaded replica takes it. Requests sharing a system prompt thus find it in one replica's cache
instead of prefilling it on every replica, each of which must keep it cached.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import grpc

from tokenmill.api.grpc import model_server_pb2 as pb
from tokenmill.api.grpc import model_server_pb2_grpc as pb_grpc
from tokenmill.api.grpc.convert import images_to_pb, output_from_pb, params_to_pb
from tokenmill.api.routing import PrefixAffinity, RoutingPolicy
from tokenmill.api.tracing import inject_context
from tokenmill.block_manager import prompt_block_hashes
from tokenmill.errors import GenerationError, ValidationError
from tokenmill.multimodal import ImageInput, image_block_keys, place_images
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


# gRPC backs off exponentially (1 s, 1.6 s, 2.6 s, ...) between attempts to reach a server that is not
# listening yet, which added ~3 s to every start-up; a model server is local or near, so retry fast: the
# wait between its socket opening and the first probe that reaches it is one backoff (at most 100 ms).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
]
READY_POLL_S = 0.05  # between probes while waiting for the first replica: a start-up waits on it


# Health probes in a row without an answer before a replica that answered before counts as unhealthy.
SLOW_PROBES_TO_UNHEALTHY = 3
# Prompt blocks hashed to route a request (4,096 tokens at 16 a block, about 0.5 ms on the router's event
# loop): enough to tell apart prefixes that share a long system prompt, bounded for very long prompts.
MAX_ROUTED_BLOCKS = 256


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.ModelServerStub
    in_flight: int = 0
    healthy: bool = False
    info: pb.InfoResponse | None = None
    num_requests: int = 0
    num_failures: int = 0
    slow_probes: int = 0  # health probes in a row that got no answer before their deadline
    draining: bool = False  # on its way out of the set: no new requests, in-flight ones finish
    lost: str | None = None  # why it left the set dead: its calls were cancelled and fail with this
    tasks: set = field(default_factory=set)


class ReplicaRouter:
    def __init__(self, addresses: Sequence[str], health_interval_s: float = 1.0, probe_timeout_s: float = 2.0,
                 policy: RoutingPolicy = RoutingPolicy(), replicas_come_later: bool = False):
        if not addresses and not replicas_come_later:
            raise ValueError("the router needs at least one model server address")
        self.replicas = [self._connect(a) for a in addresses]
        # Replicas that joined or left the set after start-up, by why: "added", "removed" (drained), "lost".
        self.changes: collections.Counter[str] = collections.Counter()
        self.health_interval_s = health_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.policy = policy
        self.affinity = PrefixAffinity()
        self.prefix_lookups = 0  # requests routed by a prefix (prompts with a full block, several replicas)
        self.prefix_hits = 0  # of which sent to the replica that served their prefix before
        self._health_task: asyncio.Task | None = None
        self.on_health: list = []  # callbacks(router) after each health round (metrics)
        # A vision-language model's image token (the server sets it from the model's processor): where a
        # prompt's images sit, whose content the replicas hash into their blocks. None: image prompts go by load.
        self.image_token_id: int | None = None

    @staticmethod
    def _connect(address: str) -> Replica:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return Replica(address, channel, pb_grpc.ModelServerStub(channel))

    async def wait_ready(self, timeout_s: float) -> pb.InfoResponse:
        """Block until one replica is ready; return its info (the model every replica must serve)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            await self.check_health()
            ready = [r for r in self.replicas if r.healthy]
            if ready:
                return ready[0].info
            if asyncio.get_running_loop().time() > deadline:
                addresses = ", ".join(r.address for r in self.replicas) or "none started yet"
                raise TimeoutError(f"no model server became ready within {timeout_s:.0f} s ({addresses})")
            await asyncio.sleep(READY_POLL_S)

    def start(self) -> None:
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        for replica in self.replicas:
            await replica.channel.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    async def check_health(self) -> None:
        async def probe(replica: Replica) -> None:
            try:
                replica.info = await replica.stub.Info(pb.InfoRequest(), timeout=self.probe_timeout_s)
                healthy, replica.slow_probes = replica.info.ready, 0
            except grpc.aio.AioRpcError as exc:
                # No answer in time is a busy replica as often as a hung one (the soak saw probes time out
                # on an overloaded machine): only a run of them takes it out. A refused connection does so at once.
                slow = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                replica.slow_probes = replica.slow_probes + 1 if slow else 0
                healthy = replica.healthy and slow and replica.slow_probes < SLOW_PROBES_TO_UNHEALTHY
            if healthy != replica.healthy:
                log = logger.info if healthy else logger.warning
                log("model server %s is now %s", replica.address, "healthy" if healthy else "unhealthy")
            if healthy:
                replica.healthy = True
            else:
                self._mark_unhealthy(replica)

        await asyncio.gather(*(probe(r) for r in list(self.replicas)))
        for callback in self.on_health:
            callback(self)

    async def batch_metrics(self) -> dict[str, str]:
        """Each healthy model server's batch samples (`BatchMetrics.snapshot`), by address, asked for at a /metrics
        scrape rather than with every health probe. One that does not answer in time is left out."""
        async def ask(replica: Replica) -> tuple[str, str]:
            try:
                info = await replica.stub.Info(pb.InfoRequest(with_batch_metrics=True), timeout=self.probe_timeout_s)
            except grpc.aio.AioRpcError:
                return replica.address, ""
            return replica.address, info.batch_metrics

        return dict(await asyncio.gather(*(ask(r) for r in list(self.replicas) if r.healthy)))

    def add_replica(self, address: str) -> Replica:
        """A model server joins the set; it gets requests once a health probe finds it ready."""
        replica = self._connect(address)
        self.replicas.append(replica)
        self.changes["added"] += 1
        logger.info("model server %s joined (%d in the set)", address, len(self.replicas))
        return replica

    async def drain(self, address: str, timeout_s: float) -> None:
        """Send `address` no new requests and wait, at most `timeout_s`, for its in-flight ones to finish."""
        replica = self._find(address)
        replica.draining = True
        self.affinity.forget(address)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while replica.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)

    async def remove_replica(self, address: str, why: str, cause: str | None = None) -> None:
        """`address` leaves the set: "removed" after a drain, or "lost" when something outside the router
        (Ray) saw it die, for `cause`. A lost replica's streams fail now with `cause`: a machine that is gone
        may never close its connections, and its streams would wait for tokens that never come."""
        replica = self._find(address)
        self.replicas.remove(replica)
        self.affinity.forget(address)
        self.changes[why] += 1
        logger.info("model server %s %s (%d left in the set)", address, why, len(self.replicas))
        if why == "lost":
            replica.lost = cause or "it died"
        await replica.channel.close()  # cancels the calls still open on it

    def _find(self, address: str) -> Replica:
        return next(r for r in self.replicas if r.address == address)

    def _mark_unhealthy(self, replica: Replica) -> None:
        """No more work for `replica` until a health probe says otherwise; its prefixes are forgotten, since
        a replica that comes back has most likely restarted with an empty cache."""
        if replica.healthy:
            self.affinity.forget(replica.address)
        replica.healthy = False

    def prefix_hashes(self, prompt_token_ids: Sequence[int], adapter: str | None,
                      images: Sequence[ImageInput] = ()) -> list[bytes]:
        """The prompt's prefix hashes as the replicas' prefix caches key them, its images' content included;
        none where routing ignores prefixes (least-loaded, one replica, no prefix cache, an adapter no replica
        has, images without a known image token)."""
        if self.policy.mode != "prefix" or len(self.replicas) < 2 or (images and self.image_token_id is None):
            return []
        info = next((r.info for r in self.replicas if r.healthy and r.info is not None), None)
        if info is None or not info.prefix_cache_block_size:
            return []
        if adapter is not None and adapter not in info.adapters:
            return []
        slot = info.adapters.index(adapter) + 1 if adapter is not None else 0  # the engine's LoRA slot
        keys = image_block_keys(place_images(prompt_token_ids, self.image_token_id, images)) if images else ()
        return list(prompt_block_hashes(prompt_token_ids, info.prefix_cache_block_size, slot, MAX_ROUTED_BLOCKS,
                                        keys))

    def pick(self, exclude: frozenset[str] = frozenset(), prefix_hashes: Sequence[bytes] = ()) -> Replica:
        """The replica for a request: the one that served its longest known prefix unless it is overloaded
        (or excluded), else the least-loaded healthy one; the prefix is remembered on the one picked."""
        healthy = [r for r in self.replicas if r.healthy and not r.draining and r.address not in exclude]
        if not healthy:
            raise GenerationError("Request failed during generation: no healthy model server")
        least_loaded = min(healthy, key=lambda r: (r.in_flight, r.num_requests))
        if not prefix_hashes:
            return least_loaded
        self.prefix_lookups += 1
        owner = self.affinity.owner(prefix_hashes)
        chosen = next((r for r in healthy if r.address == owner), None)
        if chosen is not None and chosen.in_flight - least_loaded.in_flight <= self.policy.max_imbalance:
            self.prefix_hits += 1
        else:
            chosen = least_loaded
        self.affinity.remember(prefix_hashes, chosen.address)
        return chosen

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                       adapter: str | None = None, images: Sequence[ImageInput] = ()) -> AsyncIterator[RequestOutput]:
        """The request's outputs from the replica `pick` chooses for its prompt.

        A replica that cannot be reached (killed since the last health probe) has received nothing, so
        the request goes to the next healthy one, each replica tried once. Once a replica has sent an
        output, its failure is the request's: the client has seen tokens no other replica would repeat.
        """
        request = pb.EngineRequest(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                                   params=params_to_pb(params), adapter=adapter, images=images_to_pb(images))
        prefix_hashes = self.prefix_hashes(prompt_token_ids, adapter, images)
        tried: set[str] = set()
        while True:
            replica = self.pick(frozenset(tried), prefix_hashes)
            tried.add(replica.address)
            try:
                # Closed with this generator, not later by the garbage collector: a client that leaves
                # cancels the model server's call at once.
                async with contextlib.aclosing(self._generate_on(replica, request)) as outputs:
                    async for out in outputs:
                        yield out
                return
            except _Unreached as exc:
                if not any(r.healthy and not r.draining and r.address not in tried for r in self.replicas):
                    raise exc.error from exc.__cause__
                logger.warning("model server %s unreachable; request %s goes to another", replica.address,
                               request_id)

    async def _generate_on(self, replica: Replica, request: pb.EngineRequest) -> AsyncIterator[RequestOutput]:
        replica.in_flight += 1
        replica.num_requests += 1
        call = replica.stub.Generate(request, metadata=inject_context())
        reads = _ShieldedReads(call)
        started = finished = False
        try:
            while (message := await reads.next()) is not None:
                out = output_from_pb(request.request_id, message)
                started, finished = True, out.finished
                yield out
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValidationError(exc.details()) from exc
            replica.num_failures += 1
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
                self._mark_unhealthy(replica)
            error = GenerationError(f"Request failed during generation: model server {replica.address} failed: "
                                    f"{exc.code().name}: {exc.details()}")
            if exc.code() == grpc.StatusCode.UNAVAILABLE and not started:
                raise _Unreached(error) from exc
            raise error from exc
        except asyncio.CancelledError:
            # Either this request's task was cancelled (the client left), or the call was, by the replica
            # leaving the set dead (remove_replica): only the latter is the replica's failure.
            if replica.lost is None or asyncio.current_task().cancelling():
                raise
            replica.num_failures += 1
            error = GenerationError(f"Request failed during generation: model server {replica.address} failed: "
                                    f"{replica.lost}")
            raise (error if started else _Unreached(error)) from None
        finally:
            replica.in_flight -= 1
            if not finished and not call.done():
                self._leave(replica, reads, request.request_id)

    def _leave(self, replica: Replica, reads: _ShieldedReads, request_id: str) -> None:
        """The client left mid-stream: the model server aborts the request (freeing its blocks) and its
        stream is read to the end in the background. Cancelling the call would free the request as fast,
        but grpc.aio leaks a read batch cancelled in flight (grpc/grpc#43360): the soak measured about
        1.4 KB of router RSS lost per departed client."""
        task = asyncio.get_running_loop().create_task(self._abort_and_drain(replica, reads, request_id))
        replica.tasks.add(task)
        task.add_done_callback(replica.tasks.discard)

    async def _abort_and_drain(self, replica: Replica, reads: _ShieldedReads, request_id: str) -> None:
        try:
            await replica.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=ABORT_TIMEOUT_S)
            async with asyncio.timeout(ABORT_TIMEOUT_S):
                while await reads.next() is not None:
                    pass
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            logger.warning("model server %s did not abort request %s (%s); cancelling its call", replica.address,
                           request_id, exc)
            reads.call.cancel()


# How long a model server may take to end an aborted request's stream before its call is cancelled.
ABORT_TIMEOUT_S = 10.0


class _ShieldedReads:
    """A server stream's messages (None at its end), each read shielded from its reader's cancellation.

    A read cancelled in flight leaks its batch in grpc.aio (grpc/grpc#43360). Here the read goes on when
    its reader is cancelled, and the next `next()` takes its message.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall):
        self.call = call
        self._pending: asyncio.Future | None = None

    async def next(self):
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.call.read())
        message = await asyncio.shield(self._pending)  # a CancelledError here leaves the read pending
        self._pending = None
        return None if message is grpc.aio.EOF else message


class _Unreached(Exception):
    """A replica failed before sending any output: the request may go to another one."""

    def __init__(self, error: GenerationError):
        super().__init__(str(error))
        self.error = error
