"""Tensor-parallel serving as a user runs it: `tokenmill serve --num-shard 2`, on one machine or two
launchers, a rank killed mid-generation, and a rendezvous a rank never joins.

Every server here is a real process tree (router, model server = rank 0, rank 1) on a tiny Llama
written to a folder, so the ranks' processes, rendezvous, step broadcast and failure handling are the
ones a deployment runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import httpx
import psutil
import pytest

from tests.api.conftest import free_port, wait_healthy
from tests.tiny_models import build_tiny, tiny_tokenizer
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

PROMPT_LENGTHS = (1, 5, 17, 40, 90, 200)
MAX_TOKENS = 16
KV_CACHE_BYTES = 4 << 20


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama").reference.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _prompt(length: int) -> str:
    return " ".join(f"w{4 + (i * 37) % 250}" for i in range(length))


@pytest.fixture(scope="module")
def one_rank_texts(tiny_folder) -> list[str]:
    """What a single-rank engine generates greedily for each prompt: the reference."""
    engine = Engine(EngineConfig(model_id=str(tiny_folder), backend="cpu", dtype="float32",
                                 kv_cache_bytes=KV_CACHE_BYTES, progress=False))
    prompts = [engine.tokenizer(_prompt(n)).input_ids for n in PROMPT_LENGTHS]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True))
    return [outs[-1].generated_text for outs in outputs]


class Launcher:
    """One `tokenmill serve` process with its log; the processes it started are remembered."""

    def __init__(self, folder: Path, log: Path, *flags: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "tokenmill.cli", "serve", "--hostname", "127.0.0.1", "--port",
                   str(self.port), "--grpc-port", "0", "--model-id", str(folder), "--dtype", "float32",
                   "--kv-cache-bytes", str(KV_CACHE_BYTES), *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        self.tree: list[psutil.Process] = []

    def remember_tree(self) -> None:
        self.tree = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]

    def ranks(self) -> dict[str, psutil.Process]:
        by_role = {}
        for process in self.tree:
            command = process.cmdline()
            if "shard-worker" in command:
                by_role[f"rank{command[command.index('--rank') + 1]}"] = process
            elif "model-server" in command:
                by_role["rank0"] = process
        return by_role

    def left_behind(self, grace_s: float = 15.0) -> list[psutil.Process]:
        """The launcher's processes still alive `grace_s` after it ended (the others stop in order)."""
        _, alive = psutil.wait_procs(self.tree, timeout=grace_s)
        return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def cleanup(self) -> None:
        for process in self.left_behind(grace_s=0):
            process.kill()


@pytest.fixture
def launch(tiny_folder, tmp_path):
    """Start launchers by name (logs under tmp_path); whatever is still running at the end is stopped."""
    started: list[Launcher] = []

    def start(name: str, *flags: str) -> Launcher:
        started.append(Launcher(tiny_folder, tmp_path / f"{name}.log", *flags))
        return started[-1]

    yield start
    for launcher in started:
        launcher.stop()
        launcher.cleanup()


def _complete(url: str, length: int, max_tokens: int = MAX_TOKENS) -> str:
    body = {"model": "tiny", "prompt": _prompt(length), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _concurrent_texts(url: str) -> list[str]:
    with futures.ThreadPoolExecutor(len(PROMPT_LENGTHS)) as pool:
        return list(pool.map(lambda n: _complete(url, n), PROMPT_LENGTHS))


def test_two_ranks_on_one_machine_generate_what_one_rank_does(launch, one_rank_texts) -> None:
    cores = sorted(os.sched_getaffinity(0))[:2]
    bind = ["--cpu-bind", f"{cores[0]}|{cores[1]}"] if len(cores) == 2 else []
    launcher = launch("serve", "--num-shard", "2", "--master-port", str(free_port()), *bind)
    try:
        wait_healthy(launcher.url, 120, launcher.process)
        launcher.remember_tree()
        ranks = launcher.ranks()
        assert set(ranks) == {"rank0", "rank1"}
        if bind:  # each rank pinned itself to its own core
            assert ranks["rank0"].cpu_affinity() == [cores[0]]
            assert ranks["rank1"].cpu_affinity() == [cores[1]]
        assert _concurrent_texts(launcher.url) == one_rank_texts
    finally:
        launcher.stop()
    assert "Traceback" not in launcher.log.read_text()  # SIGTERM: rank 0 sent STOP, every rank left in order
    assert not launcher.left_behind()


def test_two_launchers_one_rank_each_generate_what_one_rank_does(launch, one_rank_texts) -> None:
    master = ["--num-shard", "2", "--local-shards", "1", "--master-addr", "127.0.0.1",
              "--master-port", str(free_port())]
    second = launch("node1", *master, "--node-rank", "1")
    first = launch("node0", *master, "--node-rank", "0")
    try:
        wait_healthy(first.url, 120, first.process)
        assert second.process.poll() is None  # machine 1 runs its rank and serves nothing
        assert _concurrent_texts(first.url) == one_rank_texts
    finally:
        first.stop()
        second.process.wait(timeout=30)  # rank 0's STOP ends machine 1's launcher, cleanly
    assert second.process.returncode == 0, second.log.read_text()[-3000:]


def test_a_killed_rank_fails_the_request_and_takes_the_group_down(launch) -> None:
    launcher = launch("serve", "--num-shard", "2", "--master-port", str(free_port()))
    try:
        wait_healthy(launcher.url, 120, launcher.process)
        launcher.remember_tree()
        rank1 = launcher.ranks()["rank1"]
        first_token, events = threading.Event(), []
        body = {"model": "tiny", "prompt": _prompt(5), "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                "stream": True}

        def stream() -> None:
            try:
                with httpx.stream("POST", f"{launcher.url}/v1/completions", json=body, timeout=60) as response:
                    for line in response.iter_lines():
                        if line.startswith("data:"):
                            events.append(line[5:].strip())
                            first_token.set()
            except httpx.HTTPError as exc:
                events.append(f"transport error: {exc}")
            events.append("end")

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_token.wait(30)
        rank1.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        reader.join(timeout=10)
        assert not reader.is_alive() and time.monotonic() - killed_at < 10
        errors = [json.loads(e) for e in events if e.startswith("{") and "error" in json.loads(e)]
        assert errors, events[-3:]  # the stream ended with an error event, not [DONE] after 1000 tokens
        assert errors[-1]["error_type"] == "generation"
        # The launcher's log (the model server's included) says why, if rank 0 went down first.
        assert "tensor-parallel rank 1 died (exit code -9)" in errors[-1]["error"], launcher.log.read_text()[-3000:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # unhealthy at once, then the launcher exits for a restart
            try:
                if httpx.get(f"{launcher.url}/health", timeout=1).status_code != 200:
                    break
            except httpx.HTTPError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("/health still answers 200 ten seconds after rank 1 died")
        launcher.process.wait(timeout=30)
    finally:
        launcher.stop()
    assert launcher.process.returncode != 0
    log = launcher.log.read_text()
    assert "tensor-parallel rank 1 died (exit code -9)" in log
    assert not launcher.left_behind(), launcher.left_behind()


def test_a_rendezvous_missing_a_rank_times_out_naming_it(tiny_folder) -> None:
    # Only rank 0's machine is started: rank 1's (node 1) never comes.
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tokenmill.cli", "model-server", "--listen",
                           f"127.0.0.1:{free_port()}", "--model-id", str(tiny_folder), "--num-shard", "2",
                           "--local-shards", "1", "--master-port", str(free_port()), "--rendezvous-timeout", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "tensor-parallel ranks [1] did not join rank 0" in done.stderr
    assert "--rendezvous-timeout" in done.stderr
    assert time.monotonic() - started < 50
