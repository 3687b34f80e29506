"""`tokenmill serve --ray` on a two-node Ray cluster on loopback (`ray.cluster_utils.Cluster`), each node one
CPU and one `replica_slot`, serving a tiny random Llama: a burst scales the set from 1 to 2 replicas and the
quiet after it back to 1, with no request lost; two replicas serve, and removing one node mid-load fails
only the requests its replica was streaming. Each step is read from /metrics and /dashboard/data.

Run by `make ray-check` (which installs Ray); without Ray the module is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent import futures

import httpx
import pytest

try:
    from ray.cluster_utils import Cluster
except Exception as exc:  # not only ImportError: amdsmi without ROCm's library makes `import ray` raise KeyError
    pytest.skip(f"Ray cannot be imported here ({type(exc).__name__}: {exc}); `make ray-check` runs tests/ray in a "
                "venv with tokenmill[ray]", allow_module_level=True)

from tests.api.conftest import free_port, wait_healthy  # noqa: E402
from tests.tiny_models import build_tiny, tiny_tokenizer  # noqa: E402

# Ray's floor is 75 MB; the replicas pass nothing through the object store.
OBJECT_STORE_BYTES = 100 << 20
NODE = dict(num_cpus=1, resources={"replica_slot": 1}, object_store_memory=OBJECT_STORE_BYTES)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama").reference.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    worker = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        cluster.shutdown()


def start_router(cluster: Cluster, folder, logs, name: str, *flags: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    command = [sys.executable, "-m", "tokenmill.cli", "serve", "--ray", cluster.address, "--hostname", "127.0.0.1",
               "--port", str(port), "--grpc-port", "0", "--model-id", str(folder), "--dtype", "float32",
               "--kv-cache-bytes", str(8 << 20), *flags]
    router = subprocess.Popen(command, stderr=open(logs / f"{name}.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 240, router)
    except BaseException:
        stop(router)
        raise
    return url, router


def stop(router: subprocess.Popen) -> None:
    router.terminate()
    router.wait(timeout=60)


def metric(url: str, name: str, label: str = "") -> float:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name) and label in line)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(0.5)


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/dashboard/data", timeout=10).json()["replicas"]


def generate(url: str, tokens: int) -> int:
    body = {"prompt": "w5 w6 w7", "max_tokens": tokens, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code


def test_a_burst_adds_a_replica_and_the_quiet_after_it_removes_it(cluster, tiny_folder, tmp_path) -> None:
    # One request at a time per replica, so a burst queues; the default resources: the cpu backend's {"CPU": 1}.
    url, router = start_router(cluster[0], tiny_folder, tmp_path, "router-scale", "--max-batch-size", "1",
                               "--min-replicas", "1", "--max-replicas", "2", "--scale-down-delay", "3")
    try:
        assert metric(url, "tokenmill_replicas ") == 1
        statuses: list[int] = []
        burst_over = threading.Event()

        def client() -> None:
            while not burst_over.is_set():
                statuses.append(generate(url, 32))

        with futures.ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(client)
            try:  # until the second replica has joined and served
                wait_for(lambda: len(replicas(url)) == 2 and min(r["requests"] for r in replicas(url)) > 0, 240,
                         "a second replica serving")
                assert metric(url, "tokenmill_replica_changes_total", 'change="added"') == 2
                assert metric(url, "tokenmill_replicas ") == 2
            finally:
                burst_over.set()
        assert statuses and set(statuses) == {200}, statuses

        wait_for(lambda: metric(url, "tokenmill_replicas ") == 1, 60, "the set back to one replica")
        assert metric(url, "tokenmill_replica_changes_total", 'change="removed"') == 1
        assert len(replicas(url)) == 1
        assert metric(url, "tokenmill_replica_healthy") == 1  # the removed replica's series is gone
        data = httpx.get(f"{url}/dashboard/data", timeout=10).json()
        assert data["replica_changes"] == {"added": 2, "removed": 1}
        assert generate(url, 4) == 200
    finally:
        stop(router)


def test_removing_a_node_fails_only_its_replicas_requests(cluster, tiny_folder, tmp_path) -> None:
    """Last in the module: it removes the worker node."""
    ray_cluster, worker = cluster
    url, router = start_router(ray_cluster, tiny_folder, tmp_path, "router-kill", "--min-replicas", "2",
                               "--ray-replica-resources", json.dumps({"CPU": 1, "replica_slot": 1}))
    try:
        wait_for(lambda: metric(url, "tokenmill_replica_healthy") == 2, 240, "two healthy replicas")
        endings: list[dict] = []
        started = threading.Semaphore(0)

        def stream() -> None:
            body = {"prompt": "w5 w6 w7", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            last = None
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=180) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        if last is None:
                            started.release()
                        last = json.loads(line[5:])
            endings.append(last)

        threads = [threading.Thread(target=stream) for _ in range(6)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=120)
        time.sleep(1.5)  # the dashboard's next sample counts every stream
        in_flight = {r["address"]: r["in_flight"] for r in replicas(url)}
        assert sorted(in_flight.values()) != [0, 6] and sum(in_flight.values()) == 6, in_flight  # both serve
        ray_cluster.remove_node(worker, allow_graceful=False)  # as a machine that dies: no goodbye
        for t in threads:
            t.join()

        wait_for(lambda: len(replicas(url)) == 1, 60, "the lost replica out of the set")
        (survivor,) = [r["address"] for r in replicas(url)]
        (lost,) = set(in_flight) - {survivor}
        failed = [e for e in endings if "error" in e]
        finished = [e for e in endings if "error" not in e]
        assert len(failed) == in_flight[lost] and len(finished) == in_flight[survivor], endings
        assert all(lost in e["error"] for e in failed)
        assert all(e["choices"][0]["finish_reason"] == "length" for e in finished)
        assert metric(url, "tokenmill_replica_changes_total", 'change="lost"') == 1
        assert metric(url, "tokenmill_replicas ") == 1
        assert f'replica="{lost}"' not in httpx.get(f"{url}/metrics", timeout=10).text
        assert generate(url, 4) == 200  # the survivor serves; a replacement waits for a node with a slot
        assert httpx.get(f"{url}/dashboard/data", timeout=10).json()["replica_changes"] == {"added": 2, "lost": 1}
    finally:
        stop(router)
