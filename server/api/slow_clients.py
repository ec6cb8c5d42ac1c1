"""Slow clients may not hold the server: a request head must arrive in time, a response must be read.

- `header_timeout_protocol(seconds)`: uvicorn's h11 protocol, closing a connection whose request head
  (request line and headers) is not complete `seconds` after the connection opened or the head began
  (slowloris). uvicorn's `timeout_keep_alive` covers idle kept-alive connections.
- `SendTimeout`: an ASGI middleware giving each response message `seconds` to be sent. A client that
  stops reading a stream fills the socket buffers and blocks the send; past the timeout the response
  is abandoned, which aborts the engine request and frees its KV blocks and concurrency slot.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _head_pending = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._restart_header_timer()  # a connection that never sends a byte is closed too

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            partial = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
            if partial and not self._head_pending:
                self._restart_header_timer()  # a head has begun: it has `seconds` to be complete
            self._head_pending = partial

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _restart_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._header_timed_out)

        def _header_timed_out(self) -> None:
            self._header_timer = None
            partial = bool(self.conn.trailing_data[0])
            # an idle kept-alive connection is uvicorn's (timeout_keep_alive); a head still coming, or a
            # new connection that sent nothing, is closed here
            if self.conn.their_state is h11.IDLE and (partial or self.cycle is None) \
                    and not self.transport.is_closing():
                if partial:
                    logger.warning("closing a connection whose request head took over %g s", seconds)
                self.transport.close()

    return HeaderTimeoutH11Protocol


class SendTimeout:
    """One watchdog timer per response, not one per message: a stream sends a message per token, and
    `wait_for` around each would cost a task and two loop turns per token on the engine's CPUs. The
    watchdog checks every `seconds / 2` while nothing is being sent; a check that finds a send in progress
    re-arms for that send's deadline, so a send still blocked `seconds` after it began cancels the
    response's task then."""

    def __init__(self, app: ASGIApp, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.seconds:
            return await self.app(scope, receive, send)
        loop, task, seconds = asyncio.get_running_loop(), asyncio.current_task(), self.seconds
        sending_since: float | None = None
        expired = False

        def check() -> None:
            nonlocal watchdog, expired
            now = loop.time()
            if sending_since is not None and now - sending_since >= seconds:
                expired = True
                task.cancel()
                return
            next_check = sending_since + seconds if sending_since is not None else now + seconds / 2
            watchdog = loop.call_at(next_check, check)

        async def timed_send(message: Message) -> None:
            nonlocal sending_since
            sending_since = loop.time()
            try:
                await send(message)
            finally:
                sending_since = None

        watchdog = loop.call_later(seconds / 2, check)
        try:
            await self.app(scope, receive, timed_send)
        except asyncio.CancelledError:
            if not expired:
                raise
            if hasattr(task, "uncancel"):  # 3.11+: this cancel was ours, the task goes on to finish
                task.uncancel()
            # the app's own cleanup (stream closed -> engine request aborted) has run by now
            logger.warning("%s: the client read nothing for %g s: response abandoned", scope["path"], seconds)
        finally:
            watchdog.cancel()
