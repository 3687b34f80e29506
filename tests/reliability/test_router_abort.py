"""A client that leaves mid-stream behind the router: the model server aborts its request by id and
the stream ends normally, the call never cancelled in flight (grpc.aio leaks the read batch of a call
cancelled in flight, grpc/grpc#43360: `make soak` lost about 1.4 KB of router RSS per departed client)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from tests.reliability.conftest import model_server, tiny_engine
from tokenmill.api.router import ReplicaRouter
from tokenmill.sampling_params import SamplingParams


class GenerateEnds(grpc.aio.ServerInterceptor):
    """Records how each Generate handler on the model server ended: "completed" or the exception's name."""

    def __init__(self):
        self.ends: list[str] = []

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if not details.method.endswith("/Generate"):
            return handler

        async def watched(request, context):
            try:
                async for message in handler.unary_stream(request, context):
                    yield message
            except BaseException as exc:
                self.ends.append(type(exc).__name__)
                raise
            self.ends.append("completed")

        return grpc.unary_stream_rpc_method_handler(watched, handler.request_deserializer,
                                                    handler.response_serializer)


async def _leave_mid_stream(engine) -> list[str]:
    ends = GenerateEnds()
    async with model_server(engine, (ends,)) as address:
        router = ReplicaRouter([address])
        try:
            await router.wait_ready(30)
            two_outputs = asyncio.Event()

            async def client() -> None:
                seen = 0
                params = SamplingParams(max_new_tokens=900, ignore_eos=True)
                async for _ in router.generate("leaver", [5, 6, 7], params):
                    seen += 1
                    if seen == 2:
                        two_outputs.set()

            task = asyncio.create_task(client())
            await two_outputs.wait()
            task.cancel()  # lands while the router awaits the next output, as a disconnect does
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with asyncio.timeout(15):
                while not ends.ends or not engine.block_manager.num_free_blocks == engine.num_blocks:
                    await asyncio.sleep(0.05)
            return ends.ends
        finally:
            await router.stop()


def test_a_client_leaving_behind_the_router_aborts_by_id_and_the_stream_completes() -> None:
    engine = tiny_engine()
    assert asyncio.run(_leave_mid_stream(engine)) == ["completed"]
    assert not engine.has_unfinished()
