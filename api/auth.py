"""`--api-key`: which calls need it and how a presented key is checked, for HTTP and gRPC alike.

As in TGI, generation (and tokenization) need the key; health, info and metrics stay open, so probes
and scrapers need no secret. The scheme is case-insensitive (`Bearer`, `bearer`), the key is compared
exactly and in constant time, so a response's timing says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
from typing import Callable

import grpc

# TGI protects the generation routes only; info routes stay open.
PROTECTED_HTTP = ("/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/invocations",
                  "/vertex", "/tokenize", "/detokenize")
OPEN_GRPC_METHODS = ("ModelInfo",)


def authorized(header: str | None, api_key: str) -> bool:
    """Whether an `authorization` value (`Bearer <key>`) carries `api_key`."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def http_route_is_protected(path: str, method: str) -> bool:
    return path in PROTECTED_HTTP or (path == "/" and method == "POST")  # "/" POST is TGI's compat generate


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a protected method of `service_name` called without the key.

    `api_key` is read per call: the HTTP app's settings are replaced once the model is known.
    """

    def __init__(self, service_name: str, api_key: Callable[[], str | None]):
        self.prefix = f"/{service_name}/"
        self.api_key = api_key

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        key = self.api_key()
        method = details.method.removeprefix(self.prefix)
        if not key or not details.method.startswith(self.prefix) or method in OPEN_GRPC_METHODS:
            return handler
        if authorized(dict(details.invocation_metadata or ()).get("authorization"), key):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""
    message = "a valid API key is required: metadata `authorization: Bearer <key>`"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a streaming handler must be

    serializers = dict(request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **serializers)
    return grpc.unary_unary_rpc_method_handler(unary, **serializers)
