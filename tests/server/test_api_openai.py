"""OpenAI routes over httpx's ASGI transport, against a fake engine (incl. SSE chunks and usage)."""

from __future__ import annotations

import json

import httpx
import pytest
from api_fakes import SCRIPT, FakeEngine, load_tokenizer
from test_api_tgi import sse_events

from genserve.server.api.app import create_app
from genserve.server.grammar import GrammarSpec

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


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


def prompt_len(tokenizer, messages=MESSAGES) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


async def test_chat_completion(served):
    client, engine = served
    r = await client.post("/v1/chat/completions", json={"model": "x", "messages": MESSAGES, "temperature": 0,
                                                         "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and SCRIPT.startswith(choice["message"]["content"])
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    n_prompt = prompt_len(engine.tokenizer)
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 6, "total_tokens": n_prompt + 6}
    assert engine.seen_params[-1].is_greedy


async def test_chat_default_is_sampling_and_stop_cut(served):
    client, engine = served
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "seed": 0, "stop": "answer"})
    assert not engine.seen_params[-1].is_greedy
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == SCRIPT[: SCRIPT.index("answer")]


async def test_chat_n_logprobs(served):
    client, engine = served
    r = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "n": 2, "seed": 7, "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [p.seed for p in engine.seen_params[-2:]] == [7, 8]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and len(content[0]["top_logprobs"]) == 2
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert body["usage"]["completion_tokens"] == 6


async def test_chat_stream_with_usage(served):
    client, engine = served
    r = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == SCRIPT
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]
    assert usage["choices"] == []
    n_prompt = prompt_len(engine.tokenizer)
    n_gen = len(engine.script_ids)
    assert usage["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_chat_stream_n2_without_usage(served):
    client, _ = served
    r = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "temperature": 0, "stream": True, "n": 2, "max_tokens": 4})
    chunks = sse_events(r.text)[:-1]
    assert all("usage" not in c for c in chunks)
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
    assert texts[0] == texts[1] and texts[0]


async def test_completions(served):
    client, engine = served
    r = await client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "temperature": 0, "max_tokens": 4,
                                                    "echo": True, "logprobs": 1})
    body = r.json()
    assert body["object"] == "text_completion"
    c = body["choices"][0]
    assert c["text"].startswith("Hi") and SCRIPT.startswith(c["text"][2:])
    assert c["logprobs"]["tokens"][0] == "Hi" and c["logprobs"]["token_logprobs"][0] is None
    assert len(c["logprobs"]["tokens"]) == 5 and c["logprobs"]["text_offset"][1] == 2
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
    r = await client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "temperature": 0, "max_tokens": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert r.json()["usage"]["completion_tokens"] == 8
    r = await client.post("/v1/completions", json={"prompt": engine.tokenizer.encode("Hello"), "max_tokens": 16})
    assert r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens


async def test_completions_stream(served):
    client, _ = served
    r = await client.post("/v1/completions", json={"prompt": "Hi", "temperature": 0, "max_tokens": 5, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1] if c["choices"])
    assert SCRIPT.startswith(text) and text
    assert events[-2]["usage"]["completion_tokens"] == 5


async def test_models(served):
    client, _ = served
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list" and body["data"][0]["id"] == "fake/model"


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                       "required": ["city"]}}}


@pytest.mark.parametrize("extra, fragment", [
    ({"tools": [{"type": "function", "function": {}}]}, "`tools[0].function.name` must be"),
    ({"tools": [{"type": "function", "function": {"name": "no_tool"}}]}, "other than 'no_tool'"),
    ({"tools": [{"type": "retrieval"}]}, '`tools[0]` must be {"type": "function"'),
    ({"tools": [TOOL, TOOL]}, "two functions with the same name"),
    ({"tool_choice": "required"}, "`tool_choice` needs `tools`"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "names the function 'g'"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "`tool_choice` must be"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": "get_weather"}}, "names the function None"),
    ({"tools": [TOOL], "response_format": {"type": "json_object"}}, "cannot be combined with tool calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "`tool_calls[].function.arguments` must be a JSON string"),
    ({"response_format": {"type": "grammar", "grammar": "x"}}, "`response_format` of type `grammar` is not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "`response_format.json_schema.schema`"),
    ({"response_format": {"type": "json", "value": "{"}}, "grammar is not valid"),
    ({"response_format": {"type": "regex"}}, "grammar is not valid: a regex grammar needs"),
    ({"logit_bias": {"x": 2.0}}, "`logit_bias` keys must be token ids"),
    ({"logit_bias": {"1": 200}}, "`logit_bias` values must be >= -100 and <= 100"),
    ({"n": 5}, "`n` must be"),
    ({"top_logprobs": 2}, "`top_logprobs` requires"),
    ({"logprobs": True, "top_logprobs": 9}, "`top_logprobs` must be"),
    ({"temperature": 3}, "`temperature`"),
    ({"max_tokens": 0}, "`max_tokens`"),
    ({"max_tokens": 100000}, "must be <= 512"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4"),
])
async def test_chat_rejections(served, extra, fragment):
    client, _ = served
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, **extra})
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"] and r.json()["error_type"]


async def test_completions_rejections(served):
    client, _ = served
    r = await client.post("/v1/completions", json={"prompt": "x", "suffix": "y"})
    assert r.status_code == 422 and "Suffix is not supported" in r.json()["error"]
    r = await client.post("/v1/completions", json={"prompt": ["a"] * 5})
    assert r.status_code == 422 and "batch size" in r.json()["error"]
    r = await client.post("/v1/completions", json={"prompt": [10**9]})
    assert r.status_code == 422
    r = await client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert r.status_code == 422 and "image_url" in r.json()["error"]
    r = await client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2})
    assert r.status_code == 200


async def test_response_format_and_tgi_grammar_reach_the_engine_as_grammars(served):
    client, engine = served
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    r = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    assert engine.seen_params[-1].grammar == GrammarSpec("json", json.dumps(schema))
    # on /v1/completions too (an extension, as in vLLM), and TGI's own spellings
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                   "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and engine.seen_params[-1].grammar == GrammarSpec("json", '{"type": "object"}')
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2,
                                                        "response_format": {"type": "regex", "value": "[ab]+"}})
    assert r.status_code == 200 and engine.seen_params[-1].grammar == GrammarSpec("regex", "[ab]+")
    r = await client.post("/generate", json={"inputs": "x", "parameters": {
        "max_new_tokens": 2, "grammar": {"type": "json_schema", "value": {"name": "x", "schema": schema}}}})
    assert r.status_code == 200 and engine.seen_params[-1].grammar == GrammarSpec("json", json.dumps(schema))
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2,
                                                        "response_format": {"type": "text"}})
    assert r.status_code == 200 and engine.seen_params[-1].grammar is None


async def test_tools_become_a_grammar_over_the_calls(served, tokenizer):
    client, engine = served
    body = {"messages": MESSAGES, "max_tokens": 4, "tools": [TOOL]}
    r = await client.post("/v1/chat/completions", json={**body, "tool_choice": "required"})
    assert r.status_code == 200, r.text
    schema = json.loads(engine.seen_params[-1].grammar.value)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == TOOL["function"]["parameters"]
    # the fake model's text is no call: it comes back as content, not as a made-up tool call
    message = r.json()["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"]
    r = await client.post("/v1/chat/completions", json=body)  # auto: the calls or a plain answer
    options = json.loads(engine.seen_params[-1].grammar.value)["anyOf"]
    assert [o["properties"]["name"]["const"] for o in options] == ["get_weather", "no_tool"]
    r = await client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
    assert r.status_code == 200 and engine.seen_params[-1].grammar is None
    # SmolLM2's template has no `tools`: they are listed in the last user message instead
    prompt = tokenizer.decode(engine.seen_prompts[-1])
    assert "get_weather" in prompt and prompt.index("get_weather") > prompt.index(MESSAGES[-1]["content"])
