"""Ports for the servers, stores and rendezvous that tests start."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_LOWEST_PORT = 10_000
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default; also clear of macOS's 49152 and up


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _this_workers_share(low: int, high: int) -> tuple[int, int]:
    """Under pytest-xdist, worker gwN's own slice of [low, high): two workers' picks never meet, where random
    picks could (each process's `_handed_out` knows only its own). The servers a worker starts inherit its
    environment, and so its slice."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if count < 2 or not (worker.startswith("gw") and worker[2:].isdigit()):
        return low, high
    width = (high - low) // count
    start = low + int(worker[2:]) % count * width
    return start, start + width


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody holds now, from below the kernel's ephemeral range.

    Binding port 0 would hand back an ephemeral port, and the kernel may give that same port to
    some outgoing connection before our server binds it (CI saw EADDRINUSE that way). Ports below
    the range are never assigned on their own, so only another deliberate bind can take one.
    """
    low, _ = _ephemeral_range()
    if low > _LOWEST_PORT + 1_000:
        first, end = _this_workers_share(_LOWEST_PORT, low)
        for _ in range(1_000):
            port = random.randrange(first, end)
            if port not in _handed_out and _bindable(port, host):
                _handed_out.add(port)
                return port
    with socket.socket() as sock:  # no room below the range: the kernel's choice, with its small race
        sock.bind((host, 0))
        return sock.getsockname()[1]
