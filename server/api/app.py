"""The FastAPI application: `create_app(engine, settings)`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genserve.server.api import (
    chat_routes,
    liveness,
    lora_routes,
    openai_routes,
    platform_routes,
    tgi_routes,
    tokenize_routes,
)
from genserve.server.api.body_timeout import BodyTimeout
from genserve.server.api.draining import Drain, DrainGuard
from genserve.server.api.engine_client import EngineClient
from genserve.server.api.errors import APIError, install_error_handlers
from genserve.server.api.generation import GenerationService
from genserve.server.api.record import RequestRecord
from genserve.server.api.settings import ServerSettings, server_version
from genserve.server.api.slow_clients import SendTimeout
from genserve.server.metrics import Metrics
from genserve.server.metrics_vllm import enable_vllm_metrics
from genserve.server.tracing import RequestTimes, trace_request, tracing_enabled

logger = logging.getLogger(__name__)


async def _send_error(send: Send, status: int, message: str, error_type: str) -> None:
    body = json.dumps({"error": message, "error_type": error_type}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """API key (401) and `--payload-limit` (413) on POST routes, before any body is parsed.

    A body without Content-Length is read here up to the limit and replayed to the app.
    """

    def __init__(self, app: ASGIApp, payload_limit: int, api_key: str | None):
        self.app = app
        self.payload_limit = payload_limit
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
        if self.api_key is not None:
            scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
            # the scheme is case-insensitive (RFC 7235), the key is not; compare in constant time
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return await _send_error(send, 401, "Unauthorized: missing or wrong API key", "unauthorized")
        too_large = f"Payload too large: the request body is over the limit of {self.payload_limit} bytes"
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.payload_limit:
                return await _send_error(send, 413, too_large, "payload_too_large")
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.payload_limit:
                return await _send_error(send, 413, too_large, "payload_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def trace_record(record: RequestRecord) -> None:
    """A finished request's spans (validate, queue, prefill, decode), when --otlp-endpoint is set."""
    if not tracing_enabled():
        return
    attributes: dict = {"request_id": record.request_id, "http.status_code": record.status}
    if record.error is not None and record.status >= 400:
        attributes["error"] = record.error
    trace_request(record.route, record.request_headers, RequestTimes(
        start=record.start, end=record.end or record.start, validated=record.validated, queue_s=record.queue_s,
        first_token=record.first_token, num_generated_tokens=record.num_generated_tokens, attributes=attributes))


def create_app(engine: EngineClient, settings: ServerSettings | None = None) -> FastAPI:
    """Build the HTTP server around an engine (see `genserve.server.async_engine.AsyncEngine`).

    Startup begins the engine's warm-up in the background, so `/health` answers 503 until
    `engine.is_ready`; generation requests that arrive earlier wait for it.
    """
    settings = settings or ServerSettings()
    cfg = engine.config
    metrics = Metrics(cfg.max_input_tokens or 4096, cfg.max_total_tokens or 4096)
    metrics.bind_engine(engine)
    service = GenerationService(engine, settings, metrics)
    service.finish_observers.append(trace_record)
    if "vllm" in settings.metrics_compat:
        enable_vllm_metrics(metrics, service, str(engine.model_id), cfg.max_total_tokens or 4096)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = asyncio.ensure_future(engine.start())
        service.started = started
        started.add_done_callback(_on_started)
        try:
            yield
        finally:
            if not started.done():
                started.cancel()
            await engine.shutdown()
            service.close()

    def _on_started(fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is None:
            return
        logger.critical("engine failed to start: %r", fut.exception())
        if settings.exit_on_engine_failure:
            os.kill(os.getpid(), signal.SIGTERM)

    app = FastAPI(
        title="genserve",
        description="TGI- and OpenAI-compatible text generation server",
        version=server_version(),
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.drain = Drain()
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.include_router(tgi_routes.router)
    app.include_router(chat_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(platform_routes.router)
    app.include_router(tokenize_routes.router)
    app.include_router(lora_routes.router)
    app.include_router(liveness.router)

    @app.get("/api-doc/openapi.json", include_in_schema=False)
    async def tgi_openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    # outermost last: CORS, the send timeout, the body timeout, the API key and payload limit, the SIGTERM drain
    app.add_middleware(DrainGuard, drain=app.state.drain)
    app.add_middleware(RequestGuard, payload_limit=settings.payload_limit, api_key=settings.api_key)
    app.add_middleware(BodyTimeout, seconds=settings.request_body_timeout)
    app.add_middleware(SendTimeout, seconds=settings.send_timeout)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allow_origin or ["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["content-type", "authorization"],
    )
    return app


__all__ = ["APIError", "create_app"]
