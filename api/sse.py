"""Server-sent events framing, and the stream wrapper that turns errors into a final error event."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

from tokenmill.api.errors import error_body
from tokenmill.api.metrics import request_failed


# How the streaming routes document their 200 in /openapi.json. Before OpenAPI 3.2 an event stream's
# `schema` describes one event, as {"data", "event", "id", "retry"}; ours carry JSON in `data`.
SSE_CONTENT = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A JSON event, an error in TGI's shape, or [DONE]"}},
}}}


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class EventStreamResponse(StreamingResponse):
    """A stream whose event generator is closed when the response ends, however it ends.

    When a client disconnects, Starlette cancels the task sending the events but leaves the generator
    suspended at its `yield`; it closes only when garbage collection gets to it, seconds later when a
    middleware holds a reference. Until then the request keeps its admission permit and engine slot.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()  # unwinds `with service.admit()` and the engine stream's abort, now


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    """HTTP 200 with the events; TGI streams always answer 200 and report failures in-band."""
    base = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return EventStreamResponse(events, media_type="text/event-stream", headers={**base, **(headers or {})})


def error_event(exc: BaseException) -> str:
    request_failed(exc)  # the stream's 200 is out: the failure is counted here, not by the error handlers
    return sse(error_body(exc)[1])
