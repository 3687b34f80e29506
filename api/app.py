"""The HTTP application: routes, middleware (auth, CORS, body limit) and error handlers, in that order."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline

from tokenmill.api import dashboard, openai_api, sagemaker, tgi, vertex, vllm_routes
from tokenmill.api.auth import authorized, http_route_is_protected
from tokenmill.api.dashboard import DashboardHistory
from tokenmill.api.errors import install_error_handlers
from tokenmill.api.metrics import Metrics, ObservedRequests
from tokenmill.api.service import GenerationService
from tokenmill.api.tracing import extract_context, tracer


class PayloadLimit:
    """Stop reading a body at the payload limit, whether or not it declared a Content-Length.

    A chunked body has none, so the header check alone would let it be buffered and parsed whole,
    however large. Past the limit this answers 413 itself and tells the app the client left, so the
    app stops reading; whatever the app answers then is dropped. (Raising from `receive` instead would
    reach FastAPI's body reader wrapped in the middleware's task group and come out as a 400.) The
    limit is read per request: settings are replaced once the model is known.
    """

    def __init__(self, app, limit: Callable[[], int]):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, received, refused = self.limit(), 0, False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    await JSONResponse({"error": f"Payload too large: the limit is {limit} bytes",
                                        "error_type": "payload_too_large"}, status_code=413)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


class DeclaredLengthAndAuth:
    """A declared Content-Length over the payload limit answers 413 before any body is read; a protected
    route without the API key answers 401; a POST runs in a tracing span continued from its headers.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware passes every event
    of a streamed response through a memory stream and a task of its own: a quarter of the router's CPU
    per streamed token at 64 streams (benchmarks/NOTES.md, section 29).
    """

    def __init__(self, app, service: GenerationService):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.service.settings  # replaced once the model is known
        request = Request(scope)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.payload_limit:
            response = JSONResponse({"error": f"Payload too large: the limit is {settings.payload_limit} bytes",
                                     "error_type": "payload_too_large"}, status_code=413)
            return await response(scope, receive, send)
        if settings.api_key and http_route_is_protected(request.url.path, request.method):
            if not authorized(request.headers.get("authorization"), settings.api_key):
                return await Response(status_code=401)(scope, receive, send)
        if request.method != "POST":
            return await self.app(scope, receive, send)
        with tracer().start_as_current_span(f"router {request.url.path}",
                                            context=extract_context(dict(request.headers))):
            await self.app(scope, receive, send)


def _without(router: APIRouter, path: str) -> APIRouter:
    """`router`'s routes but the one at `path`, which another module answers."""
    return APIRouter(routes=[route for route in router.routes if getattr(route, "path", None) != path])


@contextlib.asynccontextmanager
async def _public_grpc(app: FastAPI, service: GenerationService, address: str):
    """Run the public gRPC server on this event loop; its health turns SERVING once warm."""
    from tokenmill.api.grpc.public_server import PublicGrpcServer

    grpc_server = PublicGrpcServer(service, address)
    app.state.grpc_server = grpc_server
    await grpc_server.start()

    async def follow_readiness() -> None:
        while not service.ready:
            await asyncio.sleep(0.2)
        await grpc_server.set_serving(True)

    watcher = asyncio.create_task(follow_readiness())
    try:
        yield
    finally:
        watcher.cancel()
        await grpc_server.set_serving(False)
        await grpc_server.stop()


def build_app(service: GenerationService, metrics: Metrics, grpc_address: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with contextlib.AsyncExitStack() as running:
            await running.enter_async_context(app.state.dashboard.sampling())
            if grpc_address is not None:
                await running.enter_async_context(_public_grpc(app, service, grpc_address))
            yield

    # FastAPI's own /docs and /redoc load their scripts from a CDN, blank where the server has no internet
    # access: fastapi-offline serves the same pages with Swagger UI and ReDoc from its package.
    app = FastAPIOffline(title="tokenmill", version=service.settings.version, lifespan=lifespan,
                         description="TGI- and OpenAI-compatible text generation")
    app.state.service = service
    app.state.metrics = metrics
    app.state.dashboard = DashboardHistory(service, metrics)

    app.add_middleware(DeclaredLengthAndAuth, service=service)
    app.add_middleware(CORSMiddleware, allow_origins=list(service.settings.cors_allow_origin) or ["*"],
                       allow_methods=["GET", "POST"], allow_headers=["content-type", "authorization"])
    app.add_middleware(PayloadLimit, limit=lambda: service.settings.payload_limit)
    app.add_middleware(ObservedRequests, metrics=metrics)  # outermost: every layer inside sees the request's ticket
    install_error_handlers(app, metrics)
    app.include_router(_without(tgi.router, "/tokenize"))  # vllm_routes' /tokenize takes TGI's body and vLLM's
    app.include_router(openai_api.router)
    app.include_router(sagemaker.router)
    app.include_router(vertex.router)
    app.include_router(vllm_routes.router)
    app.include_router(dashboard.router)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        await metrics.refresh()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
