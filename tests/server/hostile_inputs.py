"""Hypothesis strategies for hostile request bodies (used by test_security.py and benchmarks/fuzz_http.py):
random JSON, huge / negative / NaN numbers, deep nesting, megabyte strings, invalid UTF-8 and lone
surrogates as raw bytes, odd roles and content parts, huge or self-referencing tool and grammar specs."""

from __future__ import annotations

import json

from hypothesis import strategies as st

ROUTES = ["/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize"]
NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True))
# a token budget that is either hostile (huge, negative, NaN, a string...) or small: the fuzz stays quick
MAX_TOKENS = st.one_of(NUMBERS, st.integers(1, 8)).map(
    lambda v: 8 if isinstance(v, int | float) and 8 < v <= 10_000 else v)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=16)
MEGABYTE = "ab " * 350_000  # ~1 MB, under the 2 MB payload limit
SELF_REF_SCHEMA = {"$ref": "#", "type": "object", "properties": {"a": {"$ref": "#"}}}
DEEP_SCHEMA = json.loads('{"type": "array", "items": ' * 200 + '{"type": "integer"}' + "}" * 200)
TEXTS = st.one_of(st.text(max_size=40), st.sampled_from(["", "\ud800", "\udfff x", "\x00", "{{ 7*7 }}",
                                                         "../../etc/passwd", MEGABYTE]))
ROLES = st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "tool", "function", "",
                                   "USER", "root", "../admin", "\ud800"]), st.text(max_size=10), JSON)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXTS}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "video", "x", ""]),
                           "image_url": st.one_of(JSON, st.just({"url": "file:///etc/passwd"}))}),
    JSON)
CONTENT = st.one_of(TEXTS, st.lists(PART, max_size=3), JSON)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": ROLES, "content": CONTENT},
                                          optional={"name": JSON, "tool_calls": JSON, "tool_call_id": JSON}), JSON)
TOOL = st.one_of(
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.one_of(st.text(max_size=12), JSON),
         "parameters": st.one_of(st.just(SELF_REF_SCHEMA), st.just(DEEP_SCHEMA), JSON)})}),
    JSON)
TOOLS = st.one_of(st.lists(TOOL, max_size=3), st.just([{"type": "function", "function": {
    "name": f"f{i}", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}} for i in range(2000)]),
    JSON)
GRAMMAR = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["json", "regex", "grammar", "x"]),
                           "value": st.one_of(st.just(SELF_REF_SCHEMA), st.just(DEEP_SCHEMA), st.just("(a|b)*" * 5000),
                                              st.just("((((((("), TEXTS, JSON)}),
    JSON)
PARAMETERS_ONE = {
    "temperature": NUMBERS, "top_p": NUMBERS, "top_k": NUMBERS, "seed": NUMBERS,
    "repetition_penalty": NUMBERS, "frequency_penalty": NUMBERS, "typical_p": NUMBERS, "best_of": NUMBERS,
    "top_n_tokens": NUMBERS, "truncate": NUMBERS, "stop": st.one_of(st.lists(TEXTS, max_size=5), JSON),
    "details": JSON, "decoder_input_details": JSON, "do_sample": JSON, "grammar": GRAMMAR,
    "adapter_id": st.one_of(st.sampled_from(["../../etc/passwd", "/etc", "..", "C:\\x", "a/../../b"]), JSON),
    "watermark": JSON, "return_full_text": JSON, "frobnicate": JSON, "max_new_tokens": MAX_TOKENS}
PARAMETERS = st.fixed_dictionaries({"max_new_tokens": MAX_TOKENS},
                                   optional={k: v for k, v in PARAMETERS_ONE.items() if k != "max_new_tokens"})
OPENAI = {"temperature": NUMBERS, "top_p": NUMBERS, "n": NUMBERS, "seed": NUMBERS,
          "logprobs": JSON, "top_logprobs": NUMBERS, "stop": st.one_of(st.lists(TEXTS, max_size=5), JSON),
          "stream": st.booleans(), "stream_options": JSON, "logit_bias": JSON, "presence_penalty": NUMBERS,
          "response_format": st.one_of(st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": JSON}),
                                       st.fixed_dictionaries({"type": st.just("json_object")}), GRAMMAR, JSON),
          "model": st.one_of(st.sampled_from(["../../etc/passwd", "/etc/shadow", "..\\..\\x", "tgi"]), JSON),
          "frobnicate": JSON}
SHAPED = {
    "/generate": st.fixed_dictionaries({"inputs": TEXTS, "parameters": PARAMETERS}, optional={"stream": JSON}),
    "/generate_stream": st.fixed_dictionaries({"inputs": TEXTS, "parameters": PARAMETERS}),
    "/tokenize": st.fixed_dictionaries({"inputs": TEXTS}, optional={"parameters": PARAMETERS}),
    "/v1/completions": st.fixed_dictionaries({"prompt": st.one_of(TEXTS, st.lists(TEXTS, max_size=3),
                                                                  st.lists(NUMBERS, max_size=5), JSON),
                                              "max_tokens": MAX_TOKENS}, optional=OPENAI),
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), JSON), "max_tokens": MAX_TOKENS},
        optional={**OPENAI, "tools": TOOLS, "tool_choice": JSON, "chat_template_kwargs": JSON,
                  "add_generation_prompt": JSON, "continue_final_message": JSON}),
}


def encode(value) -> bytes:
    """JSON as Python writes it (NaN and Infinity included; lone surrogates escaped as \\udXXX)."""
    return json.dumps(value).encode()


def _raw_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    bad = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"\\ud800",
                           b'\\u0000', b"\xe2\x82"])
    return st.tuples(st.integers(0, max(len(data) - 1, 0)), bad).map(lambda t: data[:t[0]] + t[1] + data[t[0]:])


VALID = {
    "/generate": {"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
    "/generate_stream": {"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
    "/tokenize": {"inputs": "Hello"},
    "/v1/completions": {"prompt": "Hello", "max_tokens": 4},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
}
ONE_FIELD = ("/generate", "/generate_stream", "/tokenize")


@st.composite
def _one_hostile_field(draw, route: str) -> dict:
    """A valid body with one field drawn from the hostile values: most answers are then a 200."""
    body = json.loads(json.dumps(VALID[route]))
    if route in ONE_FIELD:
        name = draw(st.sampled_from(sorted(PARAMETERS_ONE)))
        body.setdefault("parameters", {})[name] = draw(PARAMETERS_ONE[name])
    else:
        fields = {**OPENAI, **({"messages": st.lists(MESSAGE, min_size=1, max_size=2), "tools": TOOLS}
                               if route == "/v1/chat/completions" else {"prompt": TEXTS})}
        name = draw(st.sampled_from(sorted(fields)))
        body[name] = draw(fields[name])
    return body


@st.composite
def hostile_request(draw) -> tuple[str, bytes]:
    """(route, body bytes)."""
    route = draw(st.sampled_from(ROUTES))
    kind = draw(st.sampled_from(["shaped", "shaped", "one", "one", "random", "raw", "deep"]))
    if kind == "one":
        return route, encode(draw(_one_hostile_field(route)))
    if kind == "random":
        return route, encode(draw(JSON))
    if kind == "deep":
        depth = draw(st.sampled_from([100, 1000, 100_000]))
        field = "inputs" if route in ("/generate", "/generate_stream", "/tokenize") else (
            "prompt" if route == "/v1/completions" else "messages")
        return route, b'{"' + field.encode() + b'": ' + b"[" * depth + b"]" * depth + b"}"
    body = encode(draw(SHAPED[route]))
    if kind == "raw":
        body = draw(_raw_mutations(body))
    return route, body
