"""The router's replica set as it grows and shrinks (what `tokenmill serve --ray` drives): a joining model
server takes requests, a draining one finishes its own and takes no new ones, a lost one fails its streams
with the cause at once; /metrics follows. One model server runs in-process on a thread, as a Ray actor runs it."""

from __future__ import annotations

import asyncio

import pytest

from tests.api.conftest import ThreadedModelServer
from tests.tiny_models import build_tiny, tiny_tokenizer
from tokenmill.api.metrics import Metrics
from tokenmill.api.router import ReplicaRouter
from tokenmill.errors import GenerationError
from tokenmill.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama").reference.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    server = ThreadedModelServer(["--model-id", str(folder), "--dtype", "float32", "--kv-cache-bytes", str(8 << 20)])
    yield server
    server.stop()


LONG = SamplingParams(max_new_tokens=900, ignore_eos=True)


async def _first_output(stream) -> None:
    async for _ in stream:
        return


def test_the_set_grows_drains_and_loses_a_replica(model_server) -> None:
    address = model_server.address
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")  # the port the system picked

    async def scenario() -> tuple[str, str, str]:
        router = ReplicaRouter([], replicas_come_later=True)
        metrics = Metrics()
        router.add_replica(address)
        await router.wait_ready(60)
        metrics.observe_replicas(router)
        joined = metrics.render().decode()

        # Draining: the request in flight finishes; no new request is taken meanwhile.
        stream = router.generate("a", [5, 6, 7], SamplingParams(max_new_tokens=40, ignore_eos=True))
        await _first_output(stream)
        drain = asyncio.create_task(router.drain(address, timeout_s=60))
        await asyncio.sleep(0)
        with pytest.raises(GenerationError, match="no healthy model server"):
            await _first_output(router.generate("b", [5], SamplingParams(max_new_tokens=2)))
        outputs = [out async for out in stream]
        assert outputs[-1].finished and outputs[-1].num_generated_tokens == 40
        await drain
        await router.remove_replica(address, "removed")

        # Lost: its stream fails at once, naming the replica and the cause.
        router.add_replica(address)
        await router.wait_ready(60)
        stream = router.generate("c", [5, 6, 7], LONG)
        await _first_output(stream)
        await router.remove_replica(address, "lost", "its Ray actor died (its node died)")
        with pytest.raises(GenerationError, match=f"model server {address} failed: its Ray actor died"):
            async for _ in stream:
                pass
        metrics.observe_replicas(router)
        after = metrics.render().decode()
        await router.stop()
        return joined, after

    joined, after = asyncio.run(scenario())
    assert "tokenmill_replicas 1.0" in joined
    assert f'tokenmill_replica_healthy{{replica="{address}"}} 1.0' in joined
    assert 'tokenmill_replica_changes_total{change="added"} 1.0' in joined
    assert "tokenmill_replicas 0.0" in after
    assert f'replica="{address}"' not in after
    for change, count in (("added", 2), ("removed", 1), ("lost", 1)):
        assert f'tokenmill_replica_changes_total{{change="{change}"}} {count}.0' in after
