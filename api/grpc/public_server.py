"""The public gRPC API (TextGeneration), with the standard health and reflection services.

It shares the HTTP API's `GenerationService`, so validation, admission and limits are the same; errors
map to gRPC status codes (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, INTERNAL). A cancelled call aborts its
request, freeing its KV blocks.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import grpc
import pydantic
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from tokenmill.api.auth import ApiKeyInterceptor
from tokenmill.api.errors import OverloadedError, UnsupportedError
from tokenmill.api.grpc import generate_pb2 as pb
from tokenmill.api.grpc import generate_pb2_grpc as pb_grpc
from tokenmill.api.metrics import request_failed
from tokenmill.api.schemas import GenerateParameters
from tokenmill.api.service import GenerationService
from tokenmill.api.validation import validate_generate
from tokenmill.errors import GenerationError, ValidationError
from tokenmill.outputs import TokenInfo

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name


def _parameters(p: pb.Parameters) -> GenerateParameters:
    def opt(name):
        return getattr(p, name) if p.HasField(name) else None

    try:
        return _checked_parameters(p, opt)
    except pydantic.ValidationError as exc:  # NaN or Infinity in a float field: INVALID_ARGUMENT, not UNKNOWN
        first = exc.errors()[0]
        raise ValidationError(f"`{'.'.join(map(str, first['loc']))}`: {first['msg']}") from None


def _checked_parameters(p: pb.Parameters, opt) -> GenerateParameters:
    return GenerateParameters(
        temperature=opt("temperature"), top_k=opt("top_k"), top_p=opt("top_p"), typical_p=opt("typical_p"),
        repetition_penalty=opt("repetition_penalty"), frequency_penalty=opt("frequency_penalty"),
        seed=opt("seed"), stop=list(p.stop), max_new_tokens=opt("max_new_tokens"), do_sample=p.do_sample,
        top_n_tokens=p.top_n_tokens or None, decoder_input_details=p.decoder_input_details, truncate=opt("truncate"),
    )


def _token(t: TokenInfo, text: str | None = None) -> pb.Token:
    token = pb.Token(id=t.id, text=t.text if text is None else text, special=t.special)
    if t.logprob is not None:
        token.logprob = t.logprob
    return token


async def _abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    request_failed(exc)
    if isinstance(exc, (ValidationError, UnsupportedError)):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Input validation error: {exc}")
    if isinstance(exc, OverloadedError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Model is overloaded")
    if isinstance(exc, GenerationError):
        await context.abort(grpc.StatusCode.INTERNAL, str(exc))
    raise exc


def _lenient(parse):
    """A request deserializer that answers None for bytes that are no such message (corrupt wire format,
    bad UTF-8), so the method can refuse them with INVALID_ARGUMENT: grpc reports a raising
    deserializer as UNKNOWN, a server fault."""

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError:
            return None

    return deserialize


MALFORMED = "Malformed request: the bytes do not decode as this method's request message"


def add_servicer(servicer: "TextGenerationServicer", server: grpc.aio.Server) -> None:
    """The generated `add_TextGenerationServicer_to_server`, with lenient request deserializers."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["TextGeneration"].methods:
        request_type, response_type = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(getattr(servicer, method.name),
                                     request_deserializer=_lenient(request_type.FromString),
                                     response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _observed(method):
    """One call is one client request in the metrics (TGI's counters), as an HTTP generation route is."""
    def observing(servicer):
        metrics = servicer.service.metrics
        return metrics.request() if metrics is not None else contextlib.nullcontext()

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            with observing(self):
                async for message in method(self, request, context):
                    yield message
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        with observing(self):
            return await method(self, request, context)
    return unary


class TextGenerationServicer(pb_grpc.TextGenerationServicer):
    def __init__(self, service: GenerationService):
        self.service = service

    def _validate(self, request: pb.GenerateRequest, stream: bool):
        self.service.checked()  # taken: counted from here, as an HTTP handler's request is
        return validate_generate(request.inputs, _parameters(request.parameters), self.service.settings,
                                 self.service.tokenizer, stream=stream)

    @_observed
    async def Generate(self, request, context):
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        try:
            valid = self._validate(request, stream=False)
            with self.service.admit():
                g = await self.service.complete(valid.prompt_ids, valid.params)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await _abort_with(context, exc)
        response = pb.GenerateResponse(generated_text=g.text, finish_reason=g.finish_reason,
                                       generated_tokens=len(g.tokens), input_tokens=g.num_prompt_tokens,
                                       tokens=[_token(t) for t in g.tokens],
                                       top_tokens=[pb.TopTokens(tokens=[_token(t) for t in s]) for s in g.top_tokens],
                                       prefill=[_token(t) for t in (g.prompt_logprobs or [])])
        if g.seed is not None:
            response.seed = g.seed
        return response

    @_observed
    async def GenerateStream(self, request, context):
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        try:
            valid = self._validate(request, stream=True)
            with self.service.admit():
                index = 0
                async for out in self.service.stream(valid.prompt_ids, valid.params):
                    for i, token in enumerate(out.new_tokens):
                        index += 1
                        message = pb.GenerateStreamResponse(index=index, token=_token(token, out.text_delta),
                                                            generated_tokens=out.num_generated_tokens)
                        if out.new_top_tokens:
                            message.top_tokens.CopyFrom(pb.TopTokens(tokens=[_token(t) for t in out.new_top_tokens[i]]))
                        if out.finished:
                            message.generated_text = out.generated_text or ""
                            message.finish_reason = out.finish_reason or ""
                        yield message
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await _abort_with(context, exc)

    async def Tokenize(self, request, context):
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        tokenizer = self.service.tokenizer
        ids = tokenizer(request.inputs, add_special_tokens=request.add_special_tokens).input_ids
        return pb.TokenizeResponse(tokens=[pb.Token(id=i, text=tokenizer.decode([i])) for i in ids])

    async def ModelInfo(self, request, context):
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        s = self.service.settings
        return pb.ModelInfoResponse(model_id=s.model_id, max_input_tokens=s.max_input_tokens,
                                    max_total_tokens=s.max_total_tokens,
                                    max_concurrent_requests=s.max_concurrent_requests,
                                    backend=s.compute_type, version=s.version)


class PublicGrpcServer:
    """grpc.aio server on the HTTP server's event loop: TextGeneration + health + reflection."""

    def __init__(self, service: GenerationService, address: str):
        self.service = service
        self.address = address
        self.server = grpc.aio.server(interceptors=[ApiKeyInterceptor(SERVICE_NAME, lambda: service.settings.api_key)])
        add_servicer(TextGenerationServicer(service), self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(address)

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(self.service.ready)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.server.stop(grace_s)
