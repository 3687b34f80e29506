"""The public gRPC API: a client generated from the repo's proto, health checking and reflection."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

def test_stream_tokens_and_unary_generate(tiny_server, run_client) -> None:
    result = run_client(tiny_server.grpc_address, """
        request = pb.GenerateRequest(inputs="w5 w6 w7", parameters=pb.Parameters(max_new_tokens=5))
        messages = list(stub.GenerateStream(request, timeout=30))
        unary = stub.Generate(request, timeout=30)
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
        tokens = stub.Tokenize(pb.TokenizeRequest(inputs="w5 w6"), timeout=10).tokens
        print(json.dumps({"indices": [m.index for m in messages], "ids": [m.token.id for m in messages],
                          "last": [messages[-1].finish_reason, messages[-1].generated_text],
                          "unary": [[t.id for t in unary.tokens], unary.generated_text],
                          "model_id": info.model_id, "tokenized": [t.id for t in tokens]}))
    """)
    assert result["indices"] == [1, 2, 3, 4, 5]
    assert result["last"][0] == "length"
    assert result["unary"] == [result["ids"], result["last"][1]]
    assert result["model_id"] == "tiny-llama" and result["tokenized"] == [5, 6]


def test_invalid_requests_get_invalid_argument(tiny_server, run_client) -> None:
    result = run_client(tiny_server.grpc_address, """
        try:
            stub.Generate(pb.GenerateRequest(inputs="w5", parameters=pb.Parameters(temperature=-1.0)), timeout=10)
            print(json.dumps({"code": "OK"}))
        except grpc.RpcError as error:
            print(json.dumps({"code": error.code().name, "details": error.details()}))
    """)
    assert result["code"] == "INVALID_ARGUMENT"
    assert "`temperature` must be strictly positive" in result["details"]


def test_cancelled_stream_frees_blocks(tiny_server, run_client) -> None:
    engine = tiny_server.engine
    run_client(tiny_server.grpc_address, """
        call = stub.GenerateStream(pb.GenerateRequest(inputs="w5 w6", parameters=pb.Parameters(max_new_tokens=800)))
        for i, _ in enumerate(call):
            if i == 3:
                break
        call.cancel()
        print("{}")
    """)
    deadline = time.monotonic() + 10
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_health_says_serving_and_reflection_lists_the_service(tiny_server) -> None:
    with grpc.insecure_channel(tiny_server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="tokenmill.v1.TextGeneration"),
                            timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "tokenmill.v1.TextGeneration" in names and "grpc.health.v1.Health" in names
