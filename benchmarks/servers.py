"""The servers under test: how each is started, when it is ready, how much memory its process tree holds."""

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from tokenmill.conformance.ports import free_port


@dataclass
class ServerSpec:
    """One server configuration: a command line that serves the OpenAI API on `port`."""

    name: str
    command: list[str]
    model: str  # the `model` field its chat endpoint accepts
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    startup_timeout_s: float = 600.0


class PeakRssSampler(threading.Thread):
    """Polls the summed RSS of a process and all its descendants; keeps the peak, and the root's own peak."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.root_peak_bytes = 0  # the process itself (`tokenmill serve`: the router)
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in processes:
                try:
                    rss = process.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                total += rss
                if process is self.root:
                    self.root_peak_bytes = max(self.root_peak_bytes, rss)
            self.peak_bytes = max(self.peak_bytes, total)

    def stop(self) -> None:
        self._stop.set()


class RunningServer:
    """A started server: its base URL, start-up time to first answer, and its memory sampler."""

    def __init__(self, spec: ServerSpec, log_dir: Path):
        self.spec = spec
        self.base_url = f"http://127.0.0.1:{spec.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{spec.name}.log"
        self._log = open(self.log_path, "ab")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            spec.command, env={**os.environ, **spec.env}, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # so stop() can signal the whole tree
        )
        self.sampler = PeakRssSampler(self.process.pid)
        self.sampler.start()
        self.startup_s = self._wait_first_answer(started)

    def _wait_first_answer(self, started: float) -> float:
        body = {"model": self.spec.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        deadline = started + self.spec.startup_timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                response = httpx.post(f"{self.base_url}/v1/chat/completions", json=body, timeout=30)
                if response.status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.spec.name} gave no answer within {self.spec.startup_timeout_s} s; see {self.log_path}")

    @property
    def peak_rss_bytes(self) -> int:
        return self.sampler.peak_bytes

    def stop(self) -> None:
        self.sampler.stop()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Anything the server left behind in its session (model-server children).
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
