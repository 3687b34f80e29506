"""A client that goes away takes its request with it: on every route, streaming or not, with siblings.

The tiny model writes 1,000 tokens in about a second, too fast to tell an abort from a natural end by
the clock. So each test holds the engine between two steps while its client sends the request and hangs
up, then lets it go: had the server not aborted the request, it would now run and finish (by length or
end of sequence), which the test would see.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from urllib.parse import urlparse

import pytest

from tokenmill.outputs import RequestOutput

MAX_NEW_TOKENS = 900  # well past what the tiny model generates in the moments the test waits


class Finishes:
    """Every request the engine finishes in a step (aborts are not step outputs)."""

    def __init__(self, runner):
        self.reasons: list[str] = []
        runner.step_listeners.append(self._record)

    def _record(self, engine, outputs: list[RequestOutput]) -> None:
        self.reasons += [out.finish_reason for out in outputs if out.finished]


@contextlib.contextmanager
def engine_held(runner):
    """Stop the engine thread between two steps until the block exits."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(timeout=30)

    runner._submit(hold)
    assert holding.wait(timeout=10), "the engine thread did not pause"
    try:
        yield
    finally:
        release.set()


def _wait(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _hang_up(server, path: str, body: dict) -> Finishes:
    """POST `body` and hang up before any answer; return what the engine finished afterwards."""
    engine, runner = server.engine, server.runner
    finishes = Finishes(runner)
    url = urlparse(server.url)
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with engine_held(runner):
        with socket.create_connection((url.hostname, url.port)) as client:
            client.sendall(head + payload)
            assert _wait(lambda: server.service.in_flight == 1, 10), "the request was never admitted"
        time.sleep(0.5)  # the server sees the disconnect and queues the aborts behind the hold
    _assert_all_freed(server)
    return finishes


def _assert_all_freed(server) -> None:
    engine = server.engine
    assert _wait(lambda: not engine.has_unfinished() and server.service.in_flight == 0, 5), \
        "the request outlived its client"
    assert engine.block_manager.num_free_blocks == engine.num_blocks


@pytest.mark.parametrize("path, body", [
    ("/generate", {"inputs": "w5 w6", "parameters": {"max_new_tokens": MAX_NEW_TOKENS}}),
    ("/generate", {"inputs": "w5 w6", "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "best_of": 2,
                                                     "do_sample": True}}),
    ("/", {"inputs": "w5 w6", "parameters": {"max_new_tokens": MAX_NEW_TOKENS}}),
    ("/v1/completions", {"prompt": "w5 w6", "max_tokens": MAX_NEW_TOKENS}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": MAX_NEW_TOKENS,
                              "n": 2}),
], ids=["generate", "generate-best_of", "compat", "completions", "chat-n2"])
def test_a_non_streaming_request_is_aborted_when_its_client_leaves(tiny_server, path, body) -> None:
    assert _hang_up(tiny_server, path, body).reasons == []  # aborted, never finished


def test_a_streaming_request_is_aborted_when_its_client_leaves(tiny_server) -> None:
    body = {"inputs": "w5 w6", "parameters": {"max_new_tokens": MAX_NEW_TOKENS}}
    assert _hang_up(tiny_server, "/generate_stream", body).reasons == []


def test_a_grpc_call_past_its_deadline_is_aborted(tiny_server, run_client) -> None:
    finishes = Finishes(tiny_server.runner)
    with engine_held(tiny_server.runner):
        result = run_client(tiny_server.grpc_address, f"""
            try:
                stub.Generate(pb.GenerateRequest(inputs="w5 w6", parameters=pb.Parameters(
                    max_new_tokens={MAX_NEW_TOKENS})), timeout=1.0)
                print(json.dumps({{"code": "OK"}}))
            except grpc.RpcError as error:
                print(json.dumps({{"code": error.code().name}}))
        """)
        assert result["code"] == "DEADLINE_EXCEEDED"
        time.sleep(0.5)
    _assert_all_freed(tiny_server)
    assert finishes.reasons == []
