"""The request pipeline's contract: the engine is reached through EngineClient (AsyncEngine and the test
fake both implement it), every request ends exactly once, and that end reaches the finish observers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from api_fakes import FakeEngine, load_tokenizer

from genserve.server.api.app import create_app
from genserve.server.api.engine_client import EngineClient
from genserve.server.async_engine import AsyncEngine
from genserve.server.config import EngineConfig
from genserve.server.lora_adapters import AdapterRegistry


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_async_engine_and_the_fake_implement_engine_client(tokenizer):
    core = SimpleNamespace(config=EngineConfig(), tokenizer=tokenizer, model_id="m", model_dir=Path("/m"),
                           dtype="float32", device=SimpleNamespace(type="cpu"), model_path_kind="native",
                           adapters=AdapterRegistry())
    assert isinstance(AsyncEngine(core), EngineClient)
    assert isinstance(FakeEngine(tokenizer), EngineClient)


@pytest.fixture
async def served(tokenizer):
    engine = FakeEngine(tokenizer)
    app = create_app(engine)
    ended = []
    app.state.service.finish_observers.append(ended.append)
    async with app.router.lifespan_context(app):
        await app.state.service.started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, engine, ended


@pytest.mark.parametrize("route, body, status", [
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, 200),
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "best_of": 2, "do_sample": True}}, 200),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, 200),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 2}, 200),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}, 200),
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 3, "stream": True}, 200),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 422),
    ("/invocations", {"inputs": "Hi", "parameters": {"max_new_tokens": 10**6}}, 422),
])
async def test_every_request_ends_once_with_its_record(served, route, body, status):
    client, engine, ended = served
    r = await client.post(route, json=body, headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                                                     "authorization": "Bearer secret"})
    assert r.status_code == status, r.text
    assert len(ended) == 1
    record = ended[0]
    assert record.done and record.status == status and record.end >= record.start
    assert record.request_headers["traceparent"].startswith("00-aaa")
    assert "authorization" not in record.request_headers  # the record never keeps credentials
    if status == 200:
        assert record.validated is not None and record.first_token is not None
        assert record.num_generated_tokens > 0
        assert record.num_prompt_tokens > 0
    assert engine.num_running == 0


async def test_best_of_counts_the_answer_only(served):
    client, _, ended = served
    r = await client.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 4, "best_of": 2, "do_sample": True, "details": True}})
    assert ended[0].num_generated_tokens == r.json()["details"]["generated_tokens"]
    assert r.headers["x-generated-tokens"] == str(r.json()["details"]["generated_tokens"])


async def test_a_failing_observer_never_fails_a_request(served):
    client, _, ended = served

    def broken(record):
        raise RuntimeError("tracing exporter down")

    client._transport.app.state.service.finish_observers.insert(0, broken)
    r = await client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and len(ended) == 1


async def test_records_are_named_after_the_route_called(served):
    client, _, ended = served
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for route, body in [("/v1/chat/completions", chat), ("/invocations", chat),
                        ("/invocations", {"prompt": "Hi", "max_tokens": 2}), ("/vertex", {"instances": [chat]})]:
        assert (await client.post(route, json=body)).status_code == 200
    assert [r.route for r in ended] == ["/v1/chat/completions", "/invocations", "/invocations", "/vertex"]
