"""A non-streaming request ends with its client: a disconnect cancels the work, freeing its KV blocks.

Starlette cancels a streaming response when its client goes away, but a plain handler that awaits a
whole generation runs on: its request would hold a batch slot and its blocks until the last token
(minutes without `max_new_tokens`), and shutdown would wait for it. TGI drops a request as soon as its
response channel closes; `until_disconnected` does the same for our non-streaming routes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready (logged as nginx's 499)."""


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects. The body is already read, so the next ASGI message the
    server sends is `http.disconnect` (or nothing until the response is sent)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise `ClientDisconnected`.

    Cancelling the work unwinds its engine streams, whose clean-up aborts their requests (and, behind
    the router, cancels the model-server call), so every sibling of an `n` or `best_of` request goes too.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.exception() is not None:
            await asyncio.wait({task})  # the server cannot report disconnects: serve the request out
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
