"""The router's own lifecycle around its model servers: stopping before any of them is up."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from tests.api.conftest import free_port


def test_sigterm_stops_a_router_still_waiting_for_its_model_server(tmp_path) -> None:
    """Fronting a model server that never comes up, the router serves 503 and waits; SIGTERM must stop it
    (cleanly, as a drain with nothing in flight) rather than wait out the start-up timeout."""
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--hostname", "127.0.0.1",
                               "--port", str(port), "--grpc-port", "0",
                               "--model-server", f"unix://{tmp_path}/nobody-listens.sock"],
                              stderr=open(tmp_path / "router.log", "w"))
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status == 503  # up, and waiting for a replica
        router.send_signal(signal.SIGTERM)
        assert router.wait(timeout=15) == 0, (tmp_path / "router.log").read_text()[-2000:]
    finally:
        if router.poll() is None:
            router.kill()
            router.wait()
