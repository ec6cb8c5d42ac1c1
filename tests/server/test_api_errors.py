"""TGI-style errors over httpx's ASGI transport: validation, limits, auth, overload, mid-stream failures."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from api_fakes import FakeEngine, load_tokenizer
from test_api_tgi import sse_events

from genserve.server.api.app import create_app
from genserve.server.api.settings import ServerSettings


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


async def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def served(tokenizer):
    engine = FakeEngine(tokenizer)
    app = create_app(engine, ServerSettings(payload_limit=8000))
    async with app.router.lifespan_context(app):
        await app.state.service.started
        async with await _client(app) as client:
            yield client, engine


def gen(parameters: dict | None = None, inputs: str = "Hello") -> dict:
    return {"inputs": inputs, "parameters": parameters or {}}


BAD_BODIES = [
    (b'{"inputs": "Hello", ', "Failed to parse the request body as JSON"),
    (b'{"inputs": 5}', "inputs"),
    (b'{"parameters": {}}', "inputs: Field required"),
    (b'{"inputs": "x", "parameters": {"max_new_tokens": "ten"}}', "parameters.max_new_tokens"),
    (b'{"inputs": "\xff\xfe"}', "UTF-8"),
    (b'{"inputs": "\\ud800"}', "UTF-8"),
    (b"[1, 2]", "Input should be"),
]

BAD_PARAMS = [
    ({"max_new_tokens": -5}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": 10**9}, "`inputs` tokens + `max_new_tokens` must be <= 512"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 500. Given: 0"),
    ({"watermark": True}, "`watermark` is not supported"),
    ({"grammar": {"type": "json", "value": "{not json"}}, "grammar is not valid: the JSON schema is not JSON"),
    ({"grammar": {"type": "json", "value": [1]}}, "grammar is not valid: a JSON schema must be an object"),
    ({"grammar": {"type": "regex", "value": ""}}, "grammar is not valid: a regex grammar needs"),
    ({"grammar": {"type": "json_schema", "value": {"name": "x"}}}, "`json_schema` needs a value with a `schema`"),
    ({"grammar": {"type": "lark", "value": "start: x"}}, "grammar"),
    ({"adapter_id": "lora"}, "Adapter 'lora' is not loaded"),
]


@pytest.mark.parametrize("raw, fragment", BAD_BODIES)
async def test_bad_bodies_are_422(served, raw, fragment):
    client, _ = served
    r = await client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"] and r.json()["error_type"] == "validation"
    assert (await client.post("/generate", json=gen({"max_new_tokens": 2}))).status_code == 200


@pytest.mark.parametrize("parameters, message", BAD_PARAMS)
async def test_bad_parameters_are_422_with_tgi_messages(served, parameters, message):
    client, _ = served
    for route in ("/generate", "/generate_stream"):
        r = await client.post(route, json=gen(parameters))
        assert r.status_code == 422, (route, r.text)
        assert r.json() == {"error": message, "error_type": "validation"} or message in r.json()["error"]
    assert (await client.post("/generate", json=gen({"max_new_tokens": 2}))).status_code == 200


async def test_prompt_limits_and_stream_only_rules(served):
    client, _ = served
    r = await client.post("/generate", json=gen({"max_new_tokens": 1}, "hello " * 600))
    assert r.status_code == 422 and r.json()["error"].startswith("`inputs`")
    r = await client.post("/generate", json=gen({"max_new_tokens": 1}, "hello " * 700))  # tokenised off-loop
    assert r.status_code == 422 and r.json()["error"].startswith("`inputs`")
    r = await client.post("/generate", json=gen({"max_new_tokens": 1, "truncate": 5}, "hello " * 600))
    assert r.status_code == 200 and r.headers["x-prompt-tokens"] == "5"
    r = await client.post("/generate", json=gen({}, ""))
    assert r.json()["error"] == "`inputs` cannot be empty"
    r = await client.post("/generate_stream", json=gen({"best_of": 2, "do_sample": True}))
    assert r.json()["error"] == "`best_of` != 1 is not supported when streaming tokens"
    r = await client.post("/generate_stream", json=gen({"decoder_input_details": True}))
    assert r.json()["error"] == "`decoder_input_details` == true is not supported when streaming tokens"


async def test_payload_limit(served):
    client, _ = served
    r = await client.post("/generate", json=gen({}, "x" * 9000))
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"

    async def chunked():
        for _ in range(10):
            yield b" " * 1000

    r = await client.post("/generate", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413

    async def small():
        yield b'{"inputs": "Hi", '
        yield b'"parameters": {"max_new_tokens": 2}}'

    r = await client.post("/generate", content=small(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


async def test_api_key(tokenizer):
    app = create_app(FakeEngine(tokenizer), ServerSettings(api_key="s3cret"))
    async with app.router.lifespan_context(app), await _client(app) as client:
        await app.state.service.started
        r = await client.post("/generate", json=gen({"max_new_tokens": 2}))
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        r = await client.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        r = await client.post("/generate", json=gen({"max_new_tokens": 2}), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/info")).status_code == 200


async def test_overloaded_is_429_and_nothing_dropped(tokenizer):
    engine = FakeEngine(tokenizer, step_delay=0.02)
    app = create_app(engine, ServerSettings(max_concurrent_requests=2))
    async with app.router.lifespan_context(app), await _client(app) as client:
        await app.state.service.started
        first = [asyncio.ensure_future(client.post("/generate_stream", json=gen({"max_new_tokens": 20})))
                 for _ in range(2)]
        while engine.num_running < 2:
            await asyncio.sleep(0.005)
        r = await client.post("/generate", json=gen({"max_new_tokens": 2}))
        assert r.status_code == 429 and r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        for task in first:
            events = sse_events((await task).text)
            assert len(events) == 20 and events[-1]["generated_text"]
        assert (await client.post("/generate", json=gen({"max_new_tokens": 2}))).status_code == 200
        text = (await client.get("/metrics")).text
        assert 'tgi_request_failure{err="overloaded"} 1' in text


async def test_generation_failure_is_424_and_sse_error_event(served):
    client, engine = served
    engine.fail_at_step = 2
    r = await client.post("/generate", json=gen({"max_new_tokens": 5}))
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    r = await client.post("/generate_stream", json=gen({"max_new_tokens": 5}))
    events = sse_events(r.text)
    assert len(events) == 3 and events[-1]["error_type"] == "generation" and "error" in events[-1]
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                         "stream": True, "max_tokens": 5})
    events = sse_events(r.text)
    assert events[-2]["error_type"] == "generation" and events[-1] == "[DONE]"
    engine.fail_at_step = None
    assert (await client.post("/generate", json=gen({"max_new_tokens": 2}))).status_code == 200


async def test_cors(tokenizer):
    app = create_app(FakeEngine(tokenizer), ServerSettings(cors_allow_origin=["https://ui.example"]))
    async with await _client(app) as client:
        r = await client.options("/generate", headers={"Origin": "https://ui.example",
                                                       "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
        r = await client.options("/generate", headers={"Origin": "https://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers


async def test_unknown_route_is_json_404(served):
    client, _ = served
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"


async def test_unexpected_error_is_json_500_and_frees_the_slot(tokenizer):
    engine = FakeEngine(tokenizer)
    app = create_app(engine, ServerSettings(max_concurrent_requests=1))
    async with app.router.lifespan_context(app), await _client(app) as client:
        await app.state.service.started

        def broken_validate(*_):
            raise KeyError("bug")

        engine.validate, real = broken_validate, engine.validate
        r = await client.post("/generate", json=gen({"max_new_tokens": 2}))
        assert r.status_code == 500 and r.json()["error_type"] == "internal"
        engine.validate = real
        assert app.state.service.num_in_flight == 0
        assert (await client.post("/generate", json=gen({"max_new_tokens": 2}))).status_code == 200


async def test_health_is_503_when_the_engine_died(served):
    client, engine = served
    engine.error = RuntimeError("device lost")
    assert (await client.get("/health")).status_code == 503


async def test_live_stays_200_through_a_drain_and_is_503_once_the_engine_died(tokenizer):
    """/health is readiness (503 while draining), /live is liveness: a long drain must not get the pod killed."""
    engine = FakeEngine(tokenizer)
    app = create_app(engine)
    async with app.router.lifespan_context(app), await _client(app) as client:
        await app.state.service.started
        assert (await client.get("/live")).status_code == 200
        app.state.drain.begin()  # what SIGTERM does
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/live")).status_code == 200
        engine.error = RuntimeError("device lost")
        r = await client.get("/live")
        assert r.status_code == 503
        assert r.json() == {"error": "the engine stopped or is stuck in a step", "error_type": "liveness"}
