"""Test servers bind ports the kernel never hands to outgoing connections (a CI run lost a module to that race)."""

from __future__ import annotations

import socket

from tokenmill.conformance.ports import _LOWEST_PORT, _ephemeral_range, free_port


def test_ports_come_from_below_the_ephemeral_range_and_are_bindable() -> None:
    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(port < low for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))


def test_a_port_someone_listens_on_is_never_handed_out(monkeypatch) -> None:
    # The spare port comes from free_port itself, so it is bindable now whatever else the suite
    # has started; a fixed number was once held by another test's server (CI saw StopIteration).
    spare = free_port()
    monkeypatch.setattr("tokenmill.conformance.ports._handed_out", set())
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        choices = iter([taken, taken, spare])
        monkeypatch.setattr("tokenmill.conformance.ports._ephemeral_range", lambda: (max(taken, spare) + 1, 60_999))
        monkeypatch.setattr("tokenmill.conformance.ports.random.randrange", lambda low, high: next(choices))
        assert free_port() == spare


def test_pytest_xdist_workers_pick_from_slices_of_their_own(monkeypatch) -> None:
    low, _ = _ephemeral_range()
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    picked = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        picked[worker] = [free_port() for _ in range(20)]
    middle = _LOWEST_PORT + (low - _LOWEST_PORT) // 2
    assert all(_LOWEST_PORT <= port < middle for port in picked["gw0"])
    assert all(middle <= port < low for port in picked["gw1"])
