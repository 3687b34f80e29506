"""Every user-facing failure mapped, in one place, to TGI's status codes and error body."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tokenmill.api.disconnect import ClientDisconnected
from tokenmill.api.schemas import ErrorResponse
from tokenmill.errors import GenerationError, ValidationError


class OverloadedError(Exception):
    """More concurrent requests than --max-concurrent-requests (HTTP 429)."""


class ModelLoadingError(Exception):
    """The model is still loading or warming up (HTTP 503)."""


class ShuttingDownError(Exception):
    """The server is draining after SIGTERM: in-flight requests finish, new ones go elsewhere (HTTP 503)."""


class TemplateError(Exception):
    """The chat template is missing or failed to render (HTTP 422)."""


class ToolError(Exception):
    """A tool-calling request that cannot be served as asked (HTTP 422, TGI's `tool_error`)."""


class UnknownModelError(Exception):
    """An OpenAI route's `model` names neither the served model nor a loaded LoRA adapter (HTTP 404)."""

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model


class UnsupportedError(Exception):
    """A request feature this server does not offer, with its TGI error_type (HTTP 422)."""

    def __init__(self, message: str, error_type: str):
        super().__init__(message)
        self.error_type = error_type


def error_body(exc: BaseException) -> tuple[int, dict[str, str]]:
    """(status, {"error", "error_type"}) for an exception, as TGI answers it."""
    if isinstance(exc, ValidationError):
        return 422, {"error": f"Input validation error: {exc}", "error_type": "validation"}
    if isinstance(exc, OverloadedError):
        return 429, {"error": "Model is overloaded", "error_type": "overloaded"}
    if isinstance(exc, ModelLoadingError):
        return 503, {"error": "Model is loading, retry shortly", "error_type": "unhealthy"}
    if isinstance(exc, ShuttingDownError):
        return 503, {"error": "Server is shutting down; retry on another replica", "error_type": "unhealthy"}
    if isinstance(exc, GenerationError):
        return 424, {"error": str(exc), "error_type": "generation"}
    if isinstance(exc, TemplateError):
        return 422, {"error": f"Template error: {exc}", "error_type": "template_error"}
    if isinstance(exc, UnsupportedError):
        return 422, {"error": str(exc), "error_type": exc.error_type}
    if isinstance(exc, ToolError):
        return 422, {"error": str(exc), "error_type": "tool_error"}
    if isinstance(exc, UnknownModelError):
        return 404, {"error": str(exc), "error_type": "model_not_found"}
    if isinstance(exc, ClientDisconnected):  # nobody reads it; access logs and metrics do
        return 499, {"error": "Client closed the connection", "error_type": "client_disconnected"}
    return 500, {"error": f"Request failed: {exc}", "error_type": "incomplete_generation"}


_ERROR_DESCRIPTIONS = {
    400: "Malformed JSON body", 404: "`model` names neither the served model nor a LoRA adapter",
    413: "Body over the payload limit", 422: "Input validation error", 424: "Generation failed",
    429: "Model is overloaded", 503: "Model loading, or server draining (with Retry-After)",
}


def error_responses(*statuses: int, auth: bool = False) -> dict[int | str, dict]:
    """OpenAPI `responses` for a route's refusals: each in TGI's error shape (the 401 of `--api-key` has
    no body). Without them FastAPI documents its own 422 body, which no route returns."""
    responses: dict[int | str, dict] = {s: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[s]}
                                        for s in statuses}
    if auth:
        responses[401] = {"description": "Missing or wrong API key (with --api-key)"}
    return responses


GENERATION_ERRORS = error_responses(400, 413, 422, 424, 429, 503, auth=True)
# A stream validates and admits after its 200 is sent: those failures, and later ones, arrive in-band.
STREAM_ERRORS = error_responses(400, 413, 422, 503, auth=True)

RETRY_AFTER_S = 1  # a 503 (loading, draining) is worth retrying soon, on this replica or another

HTTP_ERROR_TYPES = {400: "validation", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def install_error_handlers(app, metrics=None) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status, body = error_body(exc)
        if metrics is not None:
            metrics.request_failed(exc)  # TGI's tgi_request_failure{err}, once per request
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(body, status_code=status, headers=headers)

    async def handle_malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A body that does not parse: 422 with the field path, in TGI's envelope.
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": f"Malformed JSON body: {first.get('msg', exc)}", "error_type": "validation"},
                                status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        at = f"{where}: " if where else ""  # a body of no known form is wrong as a whole
        message = f"Failed to deserialize the JSON body into the target type: {at}{first.get('msg', exc)}"
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)

    async def handle_http(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body it cannot read, 404, 405, 413) in TGI's envelope, not {"detail"}.
        error_type = HTTP_ERROR_TYPES.get(exc.status_code, "http")
        return JSONResponse({"error": str(exc.detail), "error_type": error_type}, status_code=exc.status_code,
                            headers=exc.headers)

    app.add_exception_handler(HTTPException, handle_http)
    for exc_type in (ValidationError, OverloadedError, ModelLoadingError, ShuttingDownError, GenerationError, TemplateError,
                     UnsupportedError, ToolError, UnknownModelError, ClientDisconnected):
        app.add_exception_handler(exc_type, handle)
    app.add_exception_handler(RequestValidationError, handle_malformed)
