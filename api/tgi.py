"""TGI's own routes: `/generate`, `/generate_stream`, `/`, `/tokenize`, `/info`, `/health`."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.api.disconnect import until_disconnected
from tokenmill.api.errors import GENERATION_ERRORS, STREAM_ERRORS, error_responses
from tokenmill.api.schemas import (
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    Token,
    TokenizedToken,
)
from tokenmill.api.service import Generation, GenerationService
from tokenmill.api.sse import SSE_CONTENT, error_event, sse, sse_response
from tokenmill.api.validation import ValidRequest, validate_generate
from tokenmill.errors import ValidationError
from tokenmill.outputs import TokenInfo

router = APIRouter()



def _service(request: Request) -> GenerationService:
    return request.app.state.service


def _ready(request: Request) -> GenerationService:
    return request.app.state.service.checked()


def _token(t: TokenInfo) -> Token:
    return Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special)


def _details(g: Generation, with_prefill: bool) -> Details:
    prefill = [PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in (g.prompt_logprobs or [])]
    return Details(
        finish_reason=g.finish_reason,
        generated_tokens=len(g.tokens),
        seed=g.seed,
        prefill=prefill if with_prefill else [],
        tokens=[_token(t) for t in g.tokens],
        top_tokens=[[_token(t) for t in step] for step in g.top_tokens] or None,
    )


async def _generate(request: Request, service: GenerationService, body: GenerateRequest,
                    default_full_text: bool) -> JSONResponse:
    start = time.monotonic()
    valid = validate_generate(body.inputs, body.parameters, service.settings, service.tokenizer,
                              add_special_tokens=body.add_special_tokens, default_full_text=default_full_text)
    validated = time.monotonic()
    with service.admit():
        generations = await until_disconnected(request, _run_best_of(service, valid))
    best = max(generations, key=lambda g: g.mean_logprob)
    p = body.parameters
    text = (body.inputs if valid.return_full_text else "") + best.text
    response = GenerateResponse(generated_text=text)
    if p.details or p.decoder_input_details:
        response.details = _details(best, p.decoder_input_details)
        others = [g for g in generations if g is not best]
        if others:
            response.details.best_of_sequences = [
                BestOfSequence(generated_text=g.text, **_details(g, p.decoder_input_details).model_dump(
                    exclude={"best_of_sequences"})) for g in others]
    return JSONResponse(response.model_dump(exclude_none=True), headers=_timing_headers(
        service, body.inputs, start, validated, best))


async def _run_best_of(service: GenerationService, valid: ValidRequest) -> list[Generation]:
    if valid.best_of == 1:
        return [await service.complete(valid.prompt_ids, valid.params)]
    variants = [dataclasses.replace(valid.params, seed=random.getrandbits(63)) for _ in range(valid.best_of)]
    return list(await asyncio.gather(*(service.complete(valid.prompt_ids, p) for p in variants)))


def _timing_headers(service, inputs: str, start: float, validated: float, g: Generation) -> dict[str, str]:
    total = time.monotonic() - start
    per_token = g.inference_time_s / max(1, len(g.tokens))
    return {
        "x-compute-type": service.settings.compute_type,
        "x-compute-time": f"{total:.6f}",
        "x-compute-characters": str(len(inputs)),
        "x-total-time": str(int(total * 1000)),
        "x-validation-time": str(int((validated - start) * 1000)),
        "x-queue-time": str(int(g.queue_time_s * 1000)),
        "x-inference-time": str(int(g.inference_time_s * 1000)),
        "x-time-per-token": str(int(per_token * 1000)),
        "x-prompt-tokens": str(g.num_prompt_tokens),
        "x-generated-tokens": str(len(g.tokens)),
    }


async def _stream_events(service: GenerationService, body: GenerateRequest, default_full_text: bool
                         ) -> AsyncIterator[str]:
    try:
        valid = validate_generate(body.inputs, body.parameters, service.settings, service.tokenizer, stream=True,
                                  add_special_tokens=body.add_special_tokens, default_full_text=default_full_text)
        with service.admit():
            index = 0
            async for out in service.stream(valid.prompt_ids, valid.params):
                for i, token in enumerate(out.new_tokens):
                    index += 1
                    event = {"index": index, "token": _token(dataclasses.replace(token, text=out.text_delta))
                             .model_dump(), "generated_text": None, "details": None}
                    if out.new_top_tokens:
                        event["top_tokens"] = [_token(t).model_dump() for t in out.new_top_tokens[i]]
                    if out.finished:
                        prefix = body.inputs if valid.return_full_text else ""
                        event["generated_text"] = prefix + (out.generated_text or "")
                        if body.parameters.details:
                            event["details"] = {"finish_reason": out.finish_reason,
                                                "generated_tokens": out.num_generated_tokens,
                                                "seed": out.seed, "input_length": out.num_prompt_tokens}
                    yield sse(event)
    except Exception as exc:  # noqa: BLE001 - reported in-band: the status line is already sent
        yield error_event(exc)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses=GENERATION_ERRORS)
async def generate(body: GenerateRequest, request: Request):
    """Generate tokens (TGI)."""
    return await _generate(request, _ready(request), body, default_full_text=False)


@router.post("/generate_stream", response_class=StreamingResponse, responses={
    200: {"description": "Server-sent events, one a token", "content": SSE_CONTENT}, **STREAM_ERRORS})
async def generate_stream(body: GenerateRequest, request: Request):
    """Generate tokens as server-sent events (TGI)."""
    return sse_response(_stream_events(_ready(request), body, default_full_text=False),
                        {"x-compute-type": _service(request).settings.compute_type})


@router.post("/", response_model=list[GenerateResponse], response_model_exclude_none=True, responses={
    200: {"description": "A list with one response; the events when `stream` is true", "content": SSE_CONTENT},
    **GENERATION_ERRORS})
async def compat_generate(body: CompatGenerateRequest, request: Request):
    """TGI's compatibility route: a list with one response, or the stream when `stream` is true."""
    service = _ready(request)
    if body.stream:
        return sse_response(_stream_events(service, body, default_full_text=True))
    response = await _generate(request, service, body, default_full_text=True)
    import json

    return JSONResponse([json.loads(response.body)], headers={k: v for k, v in response.headers.items()
                                                              if k.startswith("x-")})


@router.post("/tokenize", response_model=list[TokenizedToken], responses=error_responses(400, 413, 422, 503))
async def tokenize(body: GenerateRequest, request: Request):
    """Tokens of `inputs` with their byte offsets (TGI)."""
    tokenizer = _ready(request).tokenizer
    truncate = body.parameters.truncate
    if truncate == 0:  # as on /generate; unlike there, no upper bound: TGI's /tokenize takes any length
        raise ValidationError(f"`truncate` must be strictly positive. Given: {truncate}")
    encoding = tokenizer(body.inputs, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True)
    ids, offsets = encoding.input_ids, encoding.offset_mapping
    if truncate is not None:
        ids, offsets = ids[-truncate:], offsets[-truncate:]
    tokens = []
    for token_id, (start, stop) in zip(ids, offsets):
        byte_start = len(body.inputs[:start].encode())
        byte_stop = len(body.inputs[:stop].encode())
        tokens.append({"id": token_id, "text": body.inputs[start:stop], "start": byte_start, "stop": byte_stop})
    return tokens


@router.get("/info")
async def info(request: Request):
    s = _service(request).settings
    return {
        "model_id": s.model_id, "model_sha": None, "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": s.max_concurrent_requests, "max_best_of": s.max_best_of,
        "max_stop_sequences": s.max_stop_sequences, "max_input_tokens": s.max_input_tokens,
        "max_total_tokens": s.max_total_tokens, "validation_workers": 1,
        "max_client_batch_size": s.max_client_batch_size, "router": "tokenmill", "version": s.version,
        "sha": None, "docker_label": None,
    }


HEALTH = {200: {"description": "Ready"}, **error_responses(503)}


@router.get("/", response_class=Response, responses=HEALTH)
@router.get("/health", response_class=Response, responses=HEALTH)
@router.get("/ping", response_class=Response, responses=HEALTH)
async def health(request: Request):
    """200 once the model is warm, 503 before and while draining (TGI's /, /health and /ping)."""
    service = _service(request)
    if service.ready and not service.draining:
        return Response(status_code=200)
    return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
