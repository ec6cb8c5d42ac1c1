"""vLLM's OpenAI extensions through the API layer (fake engine): what reaches the engine, what comes
back, and the 422 for each bad value."""

from __future__ import annotations

import httpx
import pytest
from api_fakes import SCRIPT, FakeEngine, load_tokenizer
from test_api_tgi import sse_events

from genserve.server.api.app import create_app
from genserve.server.api.vllm_extensions import bad_words_token_ids

MESSAGES = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


async def _served(tokenizer, **config):
    engine = FakeEngine(tokenizer)
    for k, v in config.items():
        setattr(engine.config, k, v)
    app = create_app(engine)
    return engine, app


@pytest.fixture
async def served(tokenizer):
    engine, app = await _served(tokenizer)
    async with app.router.lifespan_context(app):
        await app.state.service.started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, engine


@pytest.fixture
async def served_priority(tokenizer):
    engine, app = await _served(tokenizer, scheduling_policy="priority")
    async with app.router.lifespan_context(app):
        await app.state.service.started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, engine


@pytest.mark.parametrize("route, base", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": "Hi"}),
])
async def test_sampling_extensions_reach_the_engine(served, tokenizer, route, base):
    client, engine = served
    r = await client.post(route, json={**base, "max_tokens": 3, "min_p": 0.2, "allowed_token_ids": [5, 9],
                                       "bad_words": ["Paris", "big city"]})
    assert r.status_code == 200, r.text
    p = engine.seen_params[-1]
    assert p.min_p == 0.2 and p.allowed_token_ids == [5, 9]
    assert p.bad_words_token_ids == bad_words_token_ids(tokenizer, ["Paris", "big city"])
    assert tokenizer.encode("Paris", add_special_tokens=False) in p.bad_words_token_ids
    assert tokenizer.encode(" Paris", add_special_tokens=False) in p.bad_words_token_ids


async def test_include_stop_str_in_output(served):
    client, _ = served
    stop = "fake"
    assert stop in SCRIPT
    expected_cut = SCRIPT[:SCRIPT.index(stop)]
    for include, text in [(False, expected_cut), (True, expected_cut + stop)]:
        r = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 40, "stop": [stop],
                                                       "include_stop_str_in_output": include, "temperature": 0})
        assert r.json()["choices"][0]["text"] == text
        r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 40, "stop": stop,
                                                            "include_stop_str_in_output": include,
                                                            "stream": True, "temperature": 0})
        events = [e for e in sse_events(r.text) if e != "[DONE]"]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == text
        r = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 40, "stop": [stop],
                                                       "include_stop_str_in_output": include, "stream": True,
                                                       "temperature": 0})
        events = [e for e in sse_events(r.text) if e != "[DONE]"]
        assert "".join(e["choices"][0]["text"] for e in events) == text


async def test_truncate_prompt_tokens_keeps_the_last_tokens(served, tokenizer):
    client, engine = served
    prompt = "one two three four five six seven"
    ids = tokenizer(prompt)["input_ids"]
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "truncate_prompt_tokens": 3,
                                                   "echo": True})
    assert engine.seen_prompts[-1] == ids[-3:]
    assert r.json()["choices"][0]["text"].startswith(tokenizer.decode(ids[-3:]))
    assert r.json()["usage"]["prompt_tokens"] == 3
    await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "truncate_prompt_tokens": 4})
    full = tokenizer(tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    assert engine.seen_prompts[-1] == full[-4:]
    await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "truncate_prompt_tokens": -1})
    assert engine.seen_prompts[-1] == ids


async def test_prompt_logprobs_layout(served, tokenizer):
    client, engine = served
    r = await client.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 2, "prompt_logprobs": 2,
                                                   "logprobs": 1})
    assert r.status_code == 200, r.text
    p = engine.seen_params[-1]
    assert p.prompt_logprobs and p.top_n_tokens == 2
    choice = r.json()["choices"][0]
    ids = tokenizer("Hello world")["input_ids"]
    layout = choice["prompt_logprobs"]
    assert len(layout) == len(ids) and layout[0] is None
    assert all(str(t) in entry for t, entry in zip(ids[1:], layout[1:], strict=True))
    # output logprobs keep their own top-n (1), not the prompt's (2)
    assert all(len(x) <= 1 for x in choice["logprobs"]["top_logprobs"])
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 0})
    assert r.json()["prompt_logprobs"][0] is None


async def test_priority_needs_the_policy(served, served_priority):
    client, _ = served
    r = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "priority": 3})
    assert r.status_code == 422 and "--scheduling-policy priority" in r.json()["error"]
    assert (await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "priority": 0})).status_code == 200
    client, engine = served_priority
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "priority": -4})
    assert r.status_code == 200, r.text
    assert engine.seen_params[-1].priority == -4


@pytest.mark.parametrize("extra, fragment", [
    ({"min_p": 1.5}, "`min_p` must be >= 0.0 and <= 1.0"),
    ({"min_p": -0.1}, "`min_p` must be >= 0.0 and <= 1.0"),
    ({"min_p": "a"}, "min_p"),
    ({"allowed_token_ids": []}, "`allowed_token_ids` must not be empty"),
    ({"allowed_token_ids": [1, "x"]}, "allowed_token_ids"),
    ({"bad_words": [" "]}, "`bad_words` must not contain empty words"),
    ({"bad_words": "word"}, "bad_words"),
    ({"prompt_logprobs": 9}, "`prompt_logprobs` must be >= 0 and <= 5"),
    ({"prompt_logprobs": 1, "stream": True}, "`prompt_logprobs` is not available when `stream` is true"),
    ({"truncate_prompt_tokens": 0}, "`truncate_prompt_tokens` must be -1 or >= 1"),
    ({"truncate_prompt_tokens": 10**6}, "`truncate_prompt_tokens` must be -1 or >= 1"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"priority": 1.5}, "priority"),
])
async def test_bad_values_are_422(served, extra, fragment):
    client, _ = served
    for route, base in [("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "Hi"})]:
        r = await client.post(route, json={**base, "max_tokens": 2, **extra})
        assert r.status_code == 422, (route, r.text)
        assert fragment in r.json()["error"], (route, r.text)
