"""Graceful termination, HTTP side: once draining starts, health checks and new requests get 503.

Requests already in flight (streams too) keep their connection and finish; `genserve.server.shutdown`
decides when the process may exit (nothing left in flight, or `--graceful-termination-timeout`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

HEALTH_PATHS = frozenset({"/health", "/ping", "/"})
SHUTTING_DOWN = {"error": "Server is shutting down: it accepts no new requests", "error_type": "unhealthy"}


@dataclass
class Drain:
    """Set once, by SIGTERM: from then on the server only finishes what it already took."""

    started_at: float | None = None

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()


class DrainGuard:
    """503 `unhealthy` for health checks and every new POST while draining; /metrics and /info stay open."""

    def __init__(self, app: ASGIApp, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.drain.active and (
                scope["method"] == "POST" or scope["path"] in HEALTH_PATHS):
            body = json.dumps(SHUTTING_DOWN).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
