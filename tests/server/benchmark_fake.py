"""A tiny streaming endpoint for the benchmark tests: OpenAI and TGI routes, failures on request."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

from aiohttp import web


class FakeEndpoint:
    """Streams `max_tokens` one-token chunks. A prompt containing FAIL gets 503, STALL hangs, DROP cuts the
    connection mid-stream; `arrivals` holds the perf_counter time each POST came in."""

    def __init__(self, usage: bool = True, token_delay: float = 0.0):
        self.usage = usage
        self.token_delay = token_delay
        self.arrivals: list[float] = []
        self.bodies: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", lambda _: web.json_response({}))
        app.router.add_get("/v1/models", lambda _: web.json_response({"data": [{"id": "fake-model"}]}))
        app.router.add_post("/v1/completions", self.openai)
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_post("/generate_stream", self.tgi)
        return app

    async def _start(self, request: web.Request, prompt: str) -> tuple[web.StreamResponse, bool]:
        """The response to write to, and whether it is already complete (an error)."""
        self.arrivals.append(time.perf_counter())
        if "FAIL" in prompt:
            return web.json_response({"error": "overloaded", "error_type": "overloaded"}, status=503), True
        if "STALL" in prompt:
            await asyncio.sleep(3600)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if "DROP" in prompt:
            await response.write(b"data: {\"choices\": [{\"index\": 0, \"text\": \"tok \"}]}\n\n")
            request.transport.close()
            return response, True
        return response, False

    async def _send(self, response: web.StreamResponse, payload) -> None:
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        response, done = await self._start(request, prompt)
        if done:
            return response
        n = body["max_tokens"]
        if chat:
            await self._send(response, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(n):
            choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
            choice.update({"delta": {"content": "tok "}} if chat else {"text": "tok "})
            await self._send(response, {"choices": [choice]})
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            await self._send(response, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
        await self._send(response, "[DONE]")
        return response

    async def tgi(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        response, done = await self._start(request, body["inputs"])
        if done:
            return response
        n = body["parameters"]["max_new_tokens"]
        for i in range(n):
            event = {"index": i, "token": {"id": 1, "text": "tok ", "special": False}}
            if i == n - 1:
                event["details"] = {"finish_reason": "length", "generated_tokens": n, "input_length": 3}
            await self._send(response, event)
        return response


@asynccontextmanager
async def serve(endpoint: FakeEndpoint):
    """The fake on 127.0.0.1 (a free port), on the running event loop; yields its base URL."""
    runner = web.AppRunner(endpoint.app(), shutdown_timeout=0.5)  # do not wait for a STALL handler
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
