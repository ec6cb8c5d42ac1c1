"""A client that goes away aborts its request on every route, streamed or not (raw ASGI, fake engine)."""

from __future__ import annotations

import asyncio
import json

import pytest
from api_fakes import FakeEngine, load_tokenizer

from genserve.server.api.app import create_app

ROUTES = [
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 400}}),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 400}}),
    ("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 400}}),
    ("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 400}, "stream": True}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 400, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "stream": True}),
    ("/v1/completions", {"prompt": ["Hi", "Yo"], "max_tokens": 400, "ignore_eos": True, "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400,
                              "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400,
                              "ignore_eos": True, "stream": True}),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


async def _wait_until(predicate, cap: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + cap
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "state not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("route, body", ROUTES)
async def test_disconnect_mid_generation_aborts(tokenizer, route, body):
    engine = FakeEngine(tokenizer, step_delay=0.01)
    app = create_app(engine)
    raw = json.dumps(body).encode()
    gone = asyncio.Event()
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if gone.is_set() and message["type"].startswith("http.response"):
            raise OSError("client went away")  # what a server does for a closed socket

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": route, "raw_path": route.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    async with app.router.lifespan_context(app):
        await app.state.service.started
        call = asyncio.ensure_future(app(scope, receive, send))
        await _wait_until(lambda: engine.num_running > 0 and engine.seen_params)
        gone.set()
        await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 30)
        await _wait_until(lambda: engine.num_running == 0 and engine.blocks_used == 0)
        assert engine.aborted and not engine.finished
        assert app.state.service.num_in_flight == 0
        assert app.state.metrics.counter_value("tgi_request_failure", "cancelled") == 1
        assert app.state.metrics.counter_value("tgi_request_success") == 0
