"""Abort work when the HTTP client goes away, for responses that are not streamed.

A streamed response learns of a disconnect when Starlette cancels it (see `stream.SSEResponse`);
a plain JSON response only sends once generation is over, so the wait itself must watch the
ASGI receive channel, which yields `http.disconnect` once the body is read and the client leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client that closed the connection first


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready; the work was cancelled."""


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (which aborts engine requests) and
    raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()
