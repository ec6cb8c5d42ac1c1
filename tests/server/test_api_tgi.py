"""TGI native routes over httpx's ASGI transport, against a fake engine (incl. SSE frames)."""

from __future__ import annotations

import json

import httpx
import pytest
from api_fakes import SCRIPT, FakeEngine, load_tokenizer

from genserve.server.api.app import create_app
from genserve.server.api.settings import ServerSettings


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
async def served(tokenizer):
    engine = FakeEngine(tokenizer)
    app = create_app(engine, ServerSettings())
    async with app.router.lifespan_context(app):
        await app.state.service.started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, engine, app


def sse_events(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_generate_plain_and_details(served):
    client, engine, _ = served
    r = await client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"generated_text"}
    assert SCRIPT.startswith(body["generated_text"]) and body["generated_text"]
    for h in ("x-compute-type", "x-total-time", "x-validation-time", "x-queue-time", "x-inference-time",
              "x-time-per-token", "x-prompt-tokens", "x-generated-tokens", "x-request-id"):
        assert h in r.headers, h
    assert r.headers["x-generated-tokens"] == "5"

    r = await client.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 5, "details": True, "decoder_input_details": True, "top_n_tokens": 2}})
    d = r.json()["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 5 and d["seed"] is None
    assert len(d["tokens"]) == 5 and set(d["tokens"][0]) == {"id", "text", "logprob", "special"}
    assert "".join(t["text"] for t in d["tokens"]) == r.json()["generated_text"]
    assert [p["id"] for p in d["prefill"]] == engine.tokenizer.encode("Hi")
    assert len(d["top_tokens"]) == 5 and len(d["top_tokens"][0]) == 2


async def test_generate_eos_stop_and_full_text(served):
    client, _, _ = served
    r = await client.post("/generate", json={"inputs": "Q:", "parameters": {"details": True}})
    assert r.json()["details"]["finish_reason"] == "eos_token"
    assert r.json()["generated_text"] == SCRIPT
    r = await client.post("/generate", json={"inputs": "Q:", "parameters": {
        "stop": ["answer"], "details": True, "return_full_text": True}})
    body = r.json()
    assert body["details"]["finish_reason"] == "stop_sequence"
    # TGI keeps the stop sequence in generated_text
    assert body["generated_text"] == "Q:" + SCRIPT[: SCRIPT.index("answer") + len("answer")]


async def test_generate_stream_frames(served):
    client, _, _ = served
    r = await client.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert len(events) == 4
    assert [e["index"] for e in events] == [1, 2, 3, 4]
    for e in events[:-1]:
        assert e["generated_text"] is None and e["details"] is None
        assert set(e["token"]) == {"id", "text", "logprob", "special"}
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 4, "seed": None, "input_length": 1}


async def test_compat_route(served):
    client, _, _ = served
    r = await client.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    assert isinstance(r.json(), list) and r.json()[0]["generated_text"]
    r = await client.post("/", json={"inputs": "Hi", "stream": True, "parameters": {"max_new_tokens": 3}})
    assert len(sse_events(r.text)) == 3


async def test_best_of_returns_best_and_others(served):
    client, engine, _ = served
    r = await client.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 3, "best_of": 2, "do_sample": True, "details": True}})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    assert len(d["best_of_sequences"]) == 1
    assert len(engine.seen_params) == 2


async def test_tokenize_info_health_docs(served):
    client, engine, _ = served
    r = await client.post("/tokenize", json={"inputs": "Hello world"})
    toks = r.json()
    assert [t["id"] for t in toks] == engine.tokenizer.encode("Hello world")
    assert "".join(t["text"] for t in toks) == "Hello world" and toks[-1]["stop"] == 11
    info = (await client.get("/info")).json()
    for key in ("model_id", "model_sha", "model_dtype", "model_device_type", "max_concurrent_requests", "max_best_of",
                "max_stop_sequences", "max_input_tokens", "max_total_tokens", "validation_workers", "version", "sha",
                "docker_label"):
        assert key in info, key
    assert info["model_id"] == "fake/model" and info["max_total_tokens"] == 512
    assert (await client.get("/health")).status_code == 200
    engine.is_ready = False
    r = await client.get("/health")
    assert r.status_code == 503 and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    engine.is_ready = True
    assert (await client.get("/docs")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    for path in ("/generate", "/generate_stream", "/", "/tokenize", "/info", "/v1/chat/completions", "/v1/completions"):
        assert path in schema["paths"], path
    assert (await client.get("/api-doc/openapi.json")).status_code == 200


async def test_lifespan_starts_and_stops_engine(tokenizer):
    engine = FakeEngine(tokenizer)
    app = create_app(engine)
    async with app.router.lifespan_context(app):
        await app.state.service.started
        assert engine.is_ready and engine.started == 1
    assert engine.shut_down == 1
