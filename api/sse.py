"""Server-sent events framing, and the stream wrapper that turns errors into a final error event."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

from tokenmill.api.errors import error_body


# How the streaming routes document their 200 in /openapi.json. Before OpenAPI 3.2 an event stream's
# `schema` describes one event, as {"data", "event", "id", "retry"}; ours carry JSON in `data`.
SSE_CONTENT = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A JSON event, an error in TGI's shape, or [DONE]"}},
}}}


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    """HTTP 200 with the events; TGI streams always answer 200 and report failures in-band."""
    base = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers={**base, **(headers or {})})


def error_event(exc: BaseException) -> str:
    return sse(error_body(exc)[1])
