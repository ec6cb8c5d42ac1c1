"""TGI's platform routes (/invocations, /ping, /vertex, /chat_tokenize), vLLM's /v1/tokenize and
/v1/detokenize, and the chat-template extensions, over httpx's ASGI transport (fake engine)."""

from __future__ import annotations

import httpx
import pytest
from api_fakes import FakeEngine, load_tokenizer
from test_api_tgi import sse_events

from genserve.server.api.app import create_app

MESSAGES = [{"role": "user", "content": "Hi there"}]


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
            yield client, engine


def template(tokenizer, messages, **kwargs) -> str:
    kwargs.setdefault("add_generation_prompt", True)
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


async def test_invocations_tgi_body_is_compat_generate(served):
    client, _ = served
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 6, "details": True}}
    direct = (await client.post("/", json=body)).json()
    r = await client.post("/invocations", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == direct and isinstance(direct, list) and direct[0]["details"]["generated_tokens"] == 6
    assert "x-generated-tokens" in r.headers
    r = await client.post("/invocations", json={**body, "stream": True})
    events = sse_events(r.text)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1]["generated_text"] == direct[0]["generated_text"]


async def test_invocations_chat_and_completion_bodies(served):
    client, _ = served
    chat = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    direct = (await client.post("/v1/chat/completions", json=chat)).json()
    r = await client.post("/invocations", json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    assert r.json()["choices"][0]["message"] == direct["choices"][0]["message"]
    r = await client.post("/invocations", json={**chat, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == \
        direct["choices"][0]["message"]["content"]
    r = await client.post("/invocations", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


@pytest.mark.parametrize("raw, fragment", [
    (b'{"messages": [{"role": "user", "content": 3}]}', "messages.0.content"),
    (b'{"messages": []}', "messages"),
    (b'{"inputs": 1}', "inputs"),
    (b'{"prompt": "x", "max_tokens": "a"}', "max_tokens"),
    (b'{"inputs": ', "Failed to parse the request body as JSON"),
    (b'{"parameters": {}}', "inputs: Field required"),
])
async def test_invocations_bad_bodies(served, raw, fragment):
    client, _ = served
    r = await client.post("/invocations", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"] and r.json()["error_type"] == "validation"


async def test_ping_and_models(served):
    client, engine = served
    assert (await client.get("/ping")).status_code == 200
    engine.is_ready = False
    assert (await client.get("/ping")).status_code == 503
    engine.is_ready = True
    card = (await client.get("/v1/models")).json()["data"][0]
    assert card["owned_by"] == card["id"] == "fake/model"


async def test_vertex(served):
    client, _ = served
    generate = {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}
    expected_generate = (await client.post("/generate", json=generate)).json()["generated_text"]
    chat = {"messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    expected_chat = (await client.post("/v1/chat/completions", json=chat)).json()["choices"][0]["message"]["content"]
    r = await client.post("/vertex", json={"instances": [generate, chat, generate]})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [expected_generate, expected_chat, expected_generate]}
    for bad, fragment in [({"instances": []}, "instances"), ({}, "instances"),
                          ({"instances": [{"inputs": 3}]}, "instances.0.inputs"),
                          ({"instances": [{**generate, "stream": True}]}, "not supported")]:
        r = await client.post("/vertex", json=bad)
        assert r.status_code == 422 and fragment in r.json()["error"], r.text


async def test_chat_tokenize(served, tokenizer):
    client, _ = served
    r = await client.post("/chat_tokenize", json={"messages": MESSAGES, "store": True})
    assert r.status_code == 200, r.text
    text = template(tokenizer, MESSAGES)
    assert r.json()["templated_text"] == text
    tokens = r.json()["tokenize_response"]
    assert [t["id"] for t in tokens] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(t["text"] for t in tokens) == text
    assert all(text[t["start"]:t["stop"]] == t["text"] for t in tokens)


async def test_v1_tokenize_and_detokenize(served, tokenizer):
    client, _ = served
    r = await client.post("/v1/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    ids = tokenizer("Hello world")["input_ids"]
    assert r.json() == {"count": len(ids), "max_model_len": 512, "tokens": ids,
                        "token_strs": tokenizer.convert_ids_to_tokens(ids)}
    r = await client.post("/v1/tokenize", json={"messages": MESSAGES})
    assert r.json()["tokens"] == tokenizer(template(tokenizer, MESSAGES), add_special_tokens=False)["input_ids"]
    assert r.json()["token_strs"] is None
    r = await client.post("/v1/detokenize", json={"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": tokenizer.decode(ids)}
    for route, bad, fragment in [("/v1/detokenize", {"tokens": [-1]}, "`tokens` must be"),
                                 ("/v1/detokenize", {"tokens": "abc"}, "tokens"),
                                 ("/v1/tokenize", {"prompt": 5}, "prompt"),
                                 ("/v1/tokenize", {}, "prompt")]:
        r = await client.post(route, json=bad)
        assert r.status_code == 422 and fragment in r.json()["error"], r.text


@pytest.mark.parametrize("options", [
    {"add_generation_prompt": False},
    {"chat_template_kwargs": {"custom_flag": True}},
])
async def test_chat_template_options_render_as_transformers(served, tokenizer, options):
    client, engine = served
    r = await client.post("/v1/tokenize", json={"messages": MESSAGES, **options})
    kwargs = {**options.get("chat_template_kwargs", {}), **{k: v for k, v in options.items()
                                                          if k != "chat_template_kwargs"}}
    expected = tokenizer(template(tokenizer, MESSAGES, **kwargs), add_special_tokens=False)["input_ids"]
    assert r.json()["tokens"] == expected
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, **options})
    assert r.status_code == 200, r.text
    assert engine.seen_prompts[-1] == expected


async def test_continue_final_message(served, tokenizer):
    client, engine = served
    messages = [*MESSAGES, {"role": "assistant", "content": "The answer is"}]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2,
                                                       "add_generation_prompt": False,
                                                       "continue_final_message": True})
    assert r.status_code == 200, r.text
    text = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("The answer is")
    assert engine.seen_prompts[-1] == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("body, fragment", [
    ({"continue_final_message": True}, "Cannot set both"),
    ({"continue_final_message": True, "add_generation_prompt": False}, "last message to be the assistant's"),
    ({"chat_template_kwargs": {"tokenize": True}}, "`chat_template_kwargs` cannot set tokenize"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs"),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt"),
])
async def test_chat_template_option_errors(served, body, fragment):
    client, _ = served
    for route in ("/v1/chat/completions", "/v1/tokenize", "/chat_tokenize"):
        r = await client.post(route, json={"messages": MESSAGES, **body})
        assert r.status_code == 422, (route, r.text)
        assert fragment in r.json()["error"], (route, r.text)
