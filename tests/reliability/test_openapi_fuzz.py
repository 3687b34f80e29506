"""schemathesis over `/openapi.json`: every operation, valid and invalid bodies, no 5xx and no response
that breaks the documented schema; afterwards the engine holds nothing.

Bounded: `MAX_EXAMPLES` per operation and mode, no shrinking (a failure is reported as found), and a
server whose `max_total_tokens` keeps every generation short, so a request that asks for no limit
still ends quickly.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.reliability.conftest import TinyServer, assert_drained
from tokenmill.api.app import build_app
from tokenmill.api.metrics import Metrics
from tokenmill.api.service import GenerationService
from tokenmill.api.settings import ServerSettings

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, response_schema_conformance]


def _operations() -> list[str]:
    """Every operation the app declares, read from its OpenAPI document at collection time (no model)."""
    service = GenerationService(None, None, ServerSettings("collect", 1, 2))  # type: ignore[arg-type]
    document = build_app(service, Metrics()).openapi()
    return [f"{method.upper()} {path}" for path, methods in document["paths"].items() for method in methods]


@pytest.fixture(scope="module")
def server():
    server = TinyServer(max_concurrent_requests=8, max_total_tokens=128, payload_limit=20_000)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_every_route_is_fuzzed(api_schema) -> None:
    live = {result.ok().label for result in api_schema.get_all_operations()}
    assert live == set(_operations())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("label", _operations())
def test_no_server_error_and_the_documented_schema(server, api_schema, label, mode) -> None:
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    if mode == "negative" and not operation.body and not operation.query:
        pytest.skip("nothing to make invalid: the operation takes no input")

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=True)
    def fuzz(case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=60)

    fuzz()
    assert_drained(server)
