"""Unknown fields are accepted and ignored (TGI's serde, vLLM's warning); known fields stay strict."""

from __future__ import annotations

import logging

import httpx
import pytest
from api_fakes import FakeEngine, load_tokenizer

from genserve.server.api.app import create_app


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
async def served(tokenizer):
    engine = FakeEngine(tokenizer)
    app = create_app(engine)
    async with app.router.lifespan_context(app):
        await app.state.service.started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, engine, app

SDK_FIELDS = {"store": True, "metadata": {"k": "v"}, "service_tier": "auto", "user": "u-1",
              "parallel_tool_calls": False, "frobnicate": 1}
HISTORY = [
    {"role": "system", "content": "Be brief.", "cache_control": {"type": "ephemeral"}},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "refusal": None, "audio": None, "annotations": []},
    {"role": "user", "content": [{"type": "text", "text": "Again?", "extra_part_field": 1}]},
]
TOOL_HISTORY = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny", "name": "w", "is_error": False},
]


def _ignored(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "ignoring unknown fields" in r.getMessage()]


@pytest.mark.parametrize("route, body, names", [
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "foo": 1}, "bar": [1]},
     ["bar", "parameters.foo"]),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "foo": 1}}, ["parameters.foo"]),
    ("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 3}, "bar": 1}, ["bar"]),
    ("/tokenize", {"inputs": "Hi", "bar": 1}, ["bar"]),
    ("/v1/chat/completions", {"messages": HISTORY, "max_tokens": 3, **SDK_FIELDS},
     ["store", "metadata", "service_tier", "frobnicate", "messages[0].cache_control", "messages[2].refusal",
      "messages[2].audio", "messages[2].annotations"]),
    ("/v1/chat/completions", {"messages": TOOL_HISTORY, "max_tokens": 3, "stream_options": None,
                              "stream": True, "prediction": {"type": "content"}},
     ["prediction", "messages[1].refusal", "messages[2].is_error"]),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "store": True, "metadata": {}}, ["store", "metadata"]),
])
async def test_unknown_fields_are_ignored_with_one_warning(served, caplog, route, body, names):
    client, _, _ = served
    caplog.set_level(logging.WARNING, logger="genserve.request")
    r = await client.post(route, json=body)
    assert r.status_code == 200, r.text
    lines = _ignored(caplog)
    assert len(lines) == 1, lines
    for name in names:
        assert name in lines[0]
    assert "extra_part_field" not in lines[0]  # content parts are free-form
    # as vLLM: nothing about them in the response body
    assert "ignor" not in r.text and "unknown" not in r.text


async def test_no_warning_without_unknown_fields(served, caplog):
    client, _, _ = served
    caplog.set_level(logging.WARNING, logger="genserve.request")
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 2, "user": "u"})
    assert r.status_code == 200 and not _ignored(caplog)


@pytest.mark.parametrize("route, body, fragment", [
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": "3"}}, "parameters.max_new_tokens"),
    ("/generate", {"inputs": "Hi", "parameters": {"stop": "x"}}, "parameters.stop"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "store": True, "n": "2"}, "n"),
    ("/v1/completions", {"prompt": "Hi", "echo": "yes"}, "echo"),
])
async def test_known_fields_keep_strict_types(served, route, body, fragment):
    client, _, _ = served
    r = await client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and fragment in r.json()["error"]
