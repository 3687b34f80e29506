"""A replica killed behind the router, then restarted on its address.

Two `tokenmill model-server` processes behind `tokenmill serve --model-server A --model-server B`. SIGKILL
of A mid-stream: A's stream ends with an error naming A, B's stream finishes, and requests sent meanwhile
all succeed on B. A restarted on the same address is probed healthy again and gets requests; with B killed
in turn, A alone serves. Every wait is bounded; everything listens on loopback.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import CHAT_TEMPLATE, free_port, wait_healthy
from tests.reliability.conftest import wait_for
from tests.tiny_models import build_tiny, tiny_tokenizer
from tokenmill.api.router import ReplicaRouter
from tokenmill.errors import GenerationError
from tokenmill.sampling_params import SamplingParams

START_S = 120  # a model server's start-up (load and warm-up of the tiny model), on a busy machine
REJOIN_S = 30  # the router probes every replica each second


class Cluster:
    """Model servers on fixed loopback addresses, each restartable there, and a router over them."""

    def __init__(self, folder: Path, logs: Path, replicas: int = 2):
        self.folder, self.logs = folder, logs
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(replicas)]
        self.processes: list[subprocess.Popen | None] = [None] * replicas
        self.starts = [0] * replicas
        for i in range(replicas):
            self.start_replica(i)
        port = free_port()
        command = [sys.executable, "-m", "tokenmill.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
                   "--grpc-port", "0", "--model-id", str(folder)]
        for address in self.addresses:
            command += ["--model-server", address]
        log = open(logs / "router.log", "w")
        self.router = subprocess.Popen(command, stdout=log, stderr=log)
        self.url = f"http://127.0.0.1:{port}"

    def start_replica(self, i: int) -> None:
        self.starts[i] += 1
        log = open(self.logs / f"replica{i}-start{self.starts[i]}.log", "w")
        self.processes[i] = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli", "model-server", "--listen", self.addresses[i],
             "--model-id", str(self.folder), "--dtype", "float32", "--kv-cache-bytes", str(16 << 20)],
            stdout=log, stderr=log)

    def kill_replica(self, i: int) -> None:
        self.processes[i].send_signal(signal.SIGKILL)
        self.processes[i].wait(timeout=30)

    def replica_metric(self, name: str, i: int) -> float:
        """The router's per-replica gauge `name` for replica `i` (refreshed after each health round)."""
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name == name and sample.labels.get("replica") == self.addresses[i]:
                    return sample.value
        return 0.0

    def stop(self) -> None:
        for process in [self.router, *self.processes]:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in [self.router, *self.processes]:
            if process is not None:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny = build_tiny("llama")
    tiny.reference.save_pretrained(folder, safe_serialization=True)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    logs = tmp_path_factory.mktemp("logs")
    print(f"logs in {logs}")
    cluster = Cluster(folder, logs)
    try:
        wait_healthy(cluster.url, START_S, cluster.router)
        both = wait_for(lambda: all(cluster.replica_metric("tokenmill_replica_healthy", i) == 1 for i in (0, 1)),
                        START_S)
        assert both, "both replicas should be healthy in the router's eyes"
        yield cluster
    finally:
        cluster.stop()


def _generate(url: str) -> int:
    body = {"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": 3}}
    return httpx.post(f"{url}/generate", json=body, timeout=60).status_code


def _long_stream(url: str, started: threading.Semaphore, endings: list) -> None:
    """A stream that cannot end by itself before the kill (no end of sequence, 600 tokens); its last event."""
    body = {"prompt": "w5 w6", "max_tokens": 600, "ignore_eos": True, "stream": True}
    last = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                if last is None:
                    started.release()
                last = json.loads(line[len("data: "):])
    endings.append(last)


def test_a_killed_replica_fails_its_stream_only_and_rejoins_when_restarted(cluster) -> None:
    url = cluster.url
    # One long stream on each replica: the router sends each to the least-loaded one.
    started, endings = threading.Semaphore(0), []
    streams = [threading.Thread(target=_long_stream, args=(url, started, endings)) for _ in range(2)]
    for thread in streams:
        thread.start()
    for _ in streams:
        assert started.acquire(timeout=60), "a stream sent no event"
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:  # short requests all through the outage, bounded in count
        while not stop.is_set() and len(statuses) < 200:
            statuses.append(_generate(url))

    background = threading.Thread(target=traffic)
    background.start()
    cluster.kill_replica(0)
    for thread in streams:
        thread.join(timeout=120)
    statuses += [_generate(url) for _ in range(10)]
    stop.set()
    background.join(timeout=60)

    assert len(endings) == 2
    failed = [e for e in endings if "error" in e]
    finished = [e for e in endings if "choices" in e]
    assert len(failed) == 1 and len(finished) == 1, endings
    assert failed[0]["error_type"] == "generation" and cluster.addresses[0] in failed[0]["error"], failed[0]
    assert finished[0]["choices"][0]["finish_reason"] == "length"
    assert len(statuses) >= 10 and set(statuses) == {200}, statuses
    assert wait_for(lambda: cluster.replica_metric("tokenmill_replica_healthy", 0) == 0, 5)

    # Restarted on its address, replica 0 is probed healthy again and gets requests.
    before = cluster.replica_metric("tokenmill_replica_requests", 0)
    cluster.start_replica(0)
    rejoined = wait_for(lambda: cluster.replica_metric("tokenmill_replica_healthy", 0) == 1, START_S + REJOIN_S)
    assert rejoined, "the restarted replica was not taken back"
    assert [_generate(url) for _ in range(10)] == [200] * 10
    assert wait_for(lambda: cluster.replica_metric("tokenmill_replica_requests", 0) > before, 5)

    # With replica 1 killed in turn, replica 0 alone serves: it is really back.
    cluster.kill_replica(1)
    assert [_generate(url) for _ in range(5)] == [200] * 5
    assert wait_for(lambda: cluster.replica_metric("tokenmill_replica_healthy", 1) == 0, 5)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_a_replica_killed_since_the_last_probe_passes_the_request_on(cluster) -> None:
    """The router still thinks a dead replica healthy until its next probe; a request it sends there has
    reached nobody, and goes to the next replica instead of failing. Needs one live replica: run after
    the test above, whichever of the two is alive."""
    live = next(a for a, p in zip(cluster.addresses, cluster.processes) if p.poll() is None)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there

    async def run(addresses: list[str]) -> tuple[list, dict]:
        router = ReplicaRouter(addresses)
        try:
            for replica in router.replicas:
                replica.healthy = True  # as the last probe left them
                replica.num_requests = 0 if replica.address == dead else 1  # the dead one is picked first
            params = SamplingParams(max_new_tokens=3, ignore_eos=True)
            outputs = [out async for out in router.generate("r1", [5, 6, 7], params)]
            return outputs, {r.address: r for r in router.replicas}
        finally:
            await router.stop()

    outputs, replicas = asyncio.run(run([dead, live]))
    assert outputs[-1].finished and outputs[-1].num_generated_tokens == 3
    assert replicas[dead].num_failures == 1 and not replicas[dead].healthy
    assert replicas[live].num_requests == 2

    with pytest.raises(GenerationError, match=f"model server {dead} failed: UNAVAILABLE"):
        asyncio.run(run([dead]))
