"""A request body must keep coming: `BodyTimeout` answers 408 when it stalls between two chunks.

`--request-header-timeout` bounds the head; after a complete head the app reads the body, and a client
that announces a large Content-Length and then trickles or stops would hold the connection forever.
Each read of a body still incomplete gets `seconds` (nginx's `client_body_timeout` semantics: the time
between two successive chunks, not the whole body). On a stall the client gets 408 with
`connection: close`, the app sees the client gone, and whatever the app still sends is dropped. The
request never reached the engine: the body is parsed before anything is queued.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)


class BodyTimeout:
    def __init__(self, app: ASGIApp, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.seconds:
            return await self.app(scope, receive, send)
        body_done = timed_out = response_started = False

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out
            if timed_out:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()  # disconnect watchers: no timeout once the body is in
            # a task, not wait_for: a chunk that came in while the loop was busy past the deadline still counts
            reading = asyncio.ensure_future(receive())
            try:
                done, _ = await asyncio.wait({reading}, timeout=self.seconds)
            except asyncio.CancelledError:
                reading.cancel()
                raise
            if not done:
                reading.cancel()  # uvicorn's receive keeps nothing half-read
                timed_out = True
                logger.warning("%s: the request body stalled for over %g s: 408, connection closed",
                               scope["path"], self.seconds)
                if not response_started:
                    await _send_timeout(send, self.seconds)
                return {"type": "http.disconnect"}
            message = reading.result()
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if timed_out:
                return  # the 408 went out: the app's answer to a vanished client has nobody to read it
            response_started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not timed_out:
                raise
            # the app failed on the truncated body (a ClientDisconnect, say): the client has its 408


async def _send_timeout(send: Send, seconds: float) -> None:
    body = json.dumps({"error": f"Request timeout: the request body stalled for over {seconds:g} s",
                       "error_type": "request_timeout"}).encode()
    await send({"type": "http.response.start", "status": 408, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
