"""`--api-key`: every generation route answers 401 (gRPC: UNAUTHENTICATED) without the key or with a
wrong one, and serves with it; health, info and metrics stay open, as in TGI."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import TinyServer

KEY = "s3cret-Key"
ROUTES = {
    "/generate": {"inputs": "w5", "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": "w5", "parameters": {"max_new_tokens": 2}},
    "/": {"inputs": "w5", "parameters": {"max_new_tokens": 2}},
    "/tokenize": {"inputs": "w5 w6"},
    "/v1/completions": {"prompt": "w5", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2},
}
WRONG = {"none": None, "wrong key": f"Bearer {KEY}x", "key in other case": f"Bearer {KEY.lower()}",
         "no scheme": KEY, "other scheme": f"Basic {KEY}"}


@pytest.fixture(scope="module")
def keyed_server():
    server = TinyServer(max_concurrent_requests=4, api_key=KEY)
    yield server
    server.stop()


def _post(server, path: str, authorization: str | None) -> httpx.Response:
    headers = {"authorization": authorization} if authorization else {}
    return httpx.post(f"{server.url}{path}", json=ROUTES[path], headers=headers, timeout=60)


@pytest.mark.parametrize("path", list(ROUTES))
def test_generation_routes_need_the_key(keyed_server, path) -> None:
    for name, authorization in WRONG.items():
        assert _post(keyed_server, path, authorization).status_code == 401, name
    assert _post(keyed_server, path, f"Bearer {KEY}").status_code == 200
    assert _post(keyed_server, path, f"bearer {KEY}").status_code == 200  # the scheme is case-insensitive


@pytest.mark.parametrize("path", ["/health", "/info", "/metrics", "/v1/models"])
def test_health_info_and_metrics_stay_open(keyed_server, path) -> None:
    assert httpx.get(f"{keyed_server.url}{path}", timeout=30).status_code == 200


def test_grpc_generation_needs_the_key_and_model_info_does_not(keyed_server, run_client) -> None:
    result = run_client(keyed_server.grpc_address, f"""
        request = pb.GenerateRequest(inputs="w5", parameters=pb.Parameters(max_new_tokens=2))
        calls = {{
            "Generate": lambda md: stub.Generate(request, metadata=md, timeout=30),
            "GenerateStream": lambda md: list(stub.GenerateStream(request, metadata=md, timeout=30)),
            "Tokenize": lambda md: stub.Tokenize(pb.TokenizeRequest(inputs="w5"), metadata=md, timeout=30),
            "ModelInfo": lambda md: stub.ModelInfo(pb.ModelInfoRequest(), metadata=md, timeout=30),
        }}
        keys = {{"none": (), "wrong": (("authorization", "Bearer nope"),), "right": (("authorization", "Bearer {KEY}"),)}}
        codes = {{}}
        for method, call in calls.items():
            for name, metadata in keys.items():
                try:
                    call(metadata)
                    codes[f"{{method}} {{name}}"] = "OK"
                except grpc.RpcError as error:
                    codes[f"{{method}} {{name}}"] = error.code().name
        print(json.dumps(codes))
    """)
    for method in ("Generate", "GenerateStream", "Tokenize"):
        assert result[f"{method} none"] == result[f"{method} wrong"] == "UNAUTHENTICATED", result
        assert result[f"{method} right"] == "OK", result
    assert result["ModelInfo none"] == "OK"
