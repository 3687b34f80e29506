"""`POST /vertex`: Google Vertex AI's prediction body, `{"instances": [...], "parameters": {...}}` ->
`{"predictions": [text, ...]}` (TGI: router/src/vertex.rs).

An instance is TGI's `{"inputs", "parameters"}` or a chat request (`messages`, answered in TGI's
dialect, as TGI's chat handler answers); instances run concurrently and their generated texts come
back in order. Where TGI is narrower, tokenmill accepts
the superset: TGI keeps only `max_new_tokens` and `seed` of an instance's parameters (and samples),
here every TGI parameter is honoured, the body's top-level `parameters` apply to every `inputs`
instance under its own, and a failed instance answers with its own error rather than a bare 500.
"""

from __future__ import annotations

import asyncio
import json
from typing import ClassVar

from fastapi import APIRouter, Request
from pydantic import BaseModel

from tokenmill.api import openai_api, tgi
from tokenmill.api.body_forms import one_of
from tokenmill.api.errors import GENERATION_ERRORS
from tokenmill.api.schemas import GenerateParameters, GenerateRequest, RequestBody
from tokenmill.errors import ValidationError

router = APIRouter()


class GenerateInstance(RequestBody):
    honoured: ClassVar[frozenset[str]] = frozenset({"inputs", "parameters"})

    inputs: str
    parameters: GenerateParameters | None = None


VertexInstance = one_of(("inputs", "generate", GenerateInstance), ("messages", "chat", openai_api.ChatRequest))


class VertexRequest(RequestBody):
    honoured: ClassVar[frozenset[str]] = frozenset({"instances", "parameters"})

    instances: list[VertexInstance]
    parameters: GenerateParameters | None = None  # defaults for every `inputs` instance


class VertexResponse(BaseModel):
    predictions: list[str]


def _set(parameters: GenerateParameters | None) -> dict:
    return parameters.model_dump(exclude_unset=True) if parameters is not None else {}


async def _predict(request: Request, instance, defaults: dict) -> str:
    if isinstance(instance, GenerateInstance):
        # TGI samples every Vertex instance; a request may still turn that off.
        parameters = GenerateParameters(**{"do_sample": True, **defaults, **_set(instance.parameters)})
        response = await tgi.generate(GenerateRequest(inputs=instance.inputs, parameters=parameters), request)
        return json.loads(response.body)["generated_text"]
    # TGI's chat semantics, as on TGI's own route (a stop sequence stays in the text).
    response = await openai_api.serve_chat(instance.model_copy(update={"stream": False}), request, openai_api.TGI)
    return json.loads(response.body)["choices"][0]["message"]["content"]


@router.post("/vertex", response_model=VertexResponse, responses=GENERATION_ERRORS)
async def vertex(body: VertexRequest, request: Request):
    """Generate for each instance (Vertex AI's prediction route, as TGI serves it)."""
    request.app.state.service.checked()  # 503 while loading; from here the request counts, as in TGI
    if not body.instances:
        raise ValidationError("`instances` cannot be empty")
    defaults = _set(body.parameters)
    try:
        async with asyncio.TaskGroup() as group:  # the first failure cancels the other instances
            tasks = [group.create_task(_predict(request, instance, defaults)) for instance in body.instances]
    except ExceptionGroup as failures:
        raise failures.exceptions[0] from None  # answered as that instance's route would answer it
    return VertexResponse(predictions=[task.result() for task in tasks])
