"""A fuzz over the newer request fields (vLLM extensions, chat-template options, unknown fields) on every
route that takes them: whatever the values, the answer is a 2xx or a 4xx with TGI's error body, never a 5xx."""

from __future__ import annotations

import pytest
from api_fakes import FakeEngine, load_tokenizer
from starlette.testclient import TestClient

from genserve.server.api.app import create_app

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)


def near(*values):
    """The field's plausible values and their edges, or anything at all."""
    return st.one_of(st.sampled_from(values), JSON)


NEW_FIELDS = {
    "min_p": near(0.0, 0.05, 1.0, 1.0001, -0.1),
    "include_stop_str_in_output": near(True, False),
    "allowed_token_ids": st.one_of(st.lists(st.integers(-5, 60000), max_size=4), JSON),
    "bad_words": st.one_of(st.lists(st.text(max_size=10), max_size=3), JSON),
    "prompt_logprobs": near(0, 1, 5, 6, -1),
    "truncate_prompt_tokens": near(-1, 0, 1, 3, 10**9),
    "priority": near(0, 1, -1, 2**63),
    "chat_template_kwargs": st.one_of(st.dictionaries(st.sampled_from(["x", "tokenize", "enable_thinking"]),
                                                      SCALARS, max_size=2), JSON),
    "add_generation_prompt": near(True, False),
    "continue_final_message": near(True, False),
    "stream": near(True, False),
    "store": JSON, "metadata": JSON, "service_tier": JSON, "frobnicate": JSON,
}
ROUTES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant",
                                                                             "content": "Hello", "refusal": None}]}),
    ("/v1/completions", {"prompt": "Hi there"}),
    ("/invocations", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/tokenize", {"messages": [{"role": "assistant", "content": "Hi"}]}),
    ("/chat_tokenize", {"messages": [{"role": "user", "content": "Hi"}]}),
]


@pytest.fixture(scope="module")
def client():
    app = create_app(FakeEngine(load_tokenizer()))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@hypothesis.settings(max_examples=100, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(route=st.sampled_from(ROUTES), fields=st.fixed_dictionaries({}, optional=NEW_FIELDS))
def test_new_fields_never_give_a_5xx(client, route, fields):
    path, base = route
    r = client.post(path, json={**base, "max_tokens": 2, **fields})
    assert r.status_code < 500, (path, fields, r.text)
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error", "error_type"} and body["error"], body
