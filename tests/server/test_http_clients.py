"""Real HTTP: `genserve serve` (uvicorn, SmolLM2) driven by the official clients; greedy text equals transformers."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from http_server import (
    chat_ids,
    greedy_reference,
    prompt_logprob_reference,
    reference_tokenizer,
    start_server,
    text_ids,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"
N = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("serve"))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def chat_reference():
    return greedy_reference(chat_ids(MESSAGES), N)


@pytest.fixture(scope="module")
def prompt_reference():
    return greedy_reference(text_ids(PROMPT), N)


def test_openai_chat(server, chat_reference):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=N)
    assert r.choices[0].message.content == chat_reference[0]
    assert r.usage.prompt_tokens == len(chat_ids(MESSAGES))
    assert r.usage.completion_tokens == len(chat_reference[1])
    assert r.choices[0].finish_reason == ("length" if len(chat_reference[1]) == N else "stop")

    stream = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=N, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_reference[0]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_openai_completions(server, prompt_reference):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=N, logprobs=2)
    assert r.choices[0].text == prompt_reference[0]
    assert len(r.choices[0].logprobs.tokens) == len(prompt_reference[1])
    assert r.usage.completion_tokens == len(prompt_reference[1])
    stream = client.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=N, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == prompt_reference[0]
    assert client.models.list().data[0].id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_huggingface_hub_inference_client(server, chat_reference, prompt_reference):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.base_url)
    out = client.chat_completion(MESSAGES, max_tokens=N, temperature=0)
    assert out.choices[0].message.content == chat_reference[0]
    deltas = [c.choices[0].delta.content or "" for c in client.chat_completion(
        MESSAGES, max_tokens=N, temperature=0, stream=True) if c.choices]
    assert "".join(deltas) == chat_reference[0]

    assert client.text_generation(PROMPT, max_new_tokens=N) == prompt_reference[0]
    events = list(client.text_generation(PROMPT, max_new_tokens=N, stream=True, details=True))
    assert [e.token.id for e in events] == prompt_reference[1]
    assert events[-1].generated_text == prompt_reference[0]
    assert events[-1].details.generated_tokens == len(prompt_reference[1])
    full = client.text_generation(PROMPT, max_new_tokens=N, details=True, decoder_input_details=True)
    assert [t.id for t in full.details.tokens] == prompt_reference[1]
    assert [t.id for t in full.details.prefill] == text_ids(PROMPT)
    assert_logprobs_close([t.logprob for t in full.details.prefill], prompt_logprob_reference(text_ids(PROMPT)))


def assert_logprobs_close(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs) and ours[0] is None and theirs[0] is None
    assert all(abs(a - b) < 2e-4 for a, b in zip(ours[1:], theirs[1:], strict=True)), (ours, theirs)


def test_openai_completions_echo_scores_the_prompt(server, prompt_reference):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    ids = text_ids(PROMPT)
    r = client.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=4, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(PROMPT)
    assert_logprobs_close(lp.token_logprobs[:len(ids)], prompt_logprob_reference(ids))
    streamed = [c.choices[0] for c in client.completions.create(
        model="tgi", prompt=PROMPT, temperature=0, max_tokens=4, echo=True, logprobs=1, stream=True) if c.choices]
    assert streamed[0].text == PROMPT
    assert streamed[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    # each scored prompt token has its top alternatives, as vLLM/OpenAI return them (lm-eval reads them)
    assert lp.top_logprobs[0] is None
    assert all(isinstance(t, dict) and len(t) >= 1 for t in lp.top_logprobs[1:len(ids)])
    assert "".join(c.text for c in streamed) == r.choices[0].text


def test_text_generation_client(server, prompt_reference):
    from text_generation import AsyncClient, Client

    client = Client(server.base_url, timeout=60)
    r = client.generate(PROMPT, max_new_tokens=N)
    assert r.generated_text == prompt_reference[0]
    assert [t.id for t in r.details.tokens] == prompt_reference[1]
    assert r.details.finish_reason.value in ("length", "eos_token")
    events = list(client.generate_stream(PROMPT, max_new_tokens=N))
    assert "".join(e.token.text for e in events if not e.token.special) == prompt_reference[0]
    assert events[-1].generated_text == prompt_reference[0]

    async def use_async():
        aclient = AsyncClient(server.base_url, timeout=60)
        r = await aclient.generate(PROMPT, max_new_tokens=N)
        events = [e async for e in aclient.generate_stream(PROMPT, max_new_tokens=N)]
        return r, events

    r, events = asyncio.run(use_async())
    assert r.generated_text == prompt_reference[0]
    assert events[-1].generated_text == prompt_reference[0]
    assert events[-1].details.generated_tokens == len(prompt_reference[1])


def test_32_concurrent_streams(server):
    prompts = [f"List {k} animals that live in the" for k in range(2, 10)]

    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            answers = await asyncio.gather(*[
                client.post("/generate", json={"inputs": p, "parameters": {"max_new_tokens": 12}}) for p in prompts])
            answers = [a.json()["generated_text"] for a in answers]
            before = server.metrics()["tgi_request_success"]

            async def tgi_stream(p):
                text = ""
                async with client.stream("POST", "/generate_stream",
                                         json={"inputs": p, "parameters": {"max_new_tokens": 12}}) as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            event = json.loads(line[5:])
                            text += event["token"]["text"] if not event["token"]["special"] else ""
                            final = event["generated_text"]
                assert final == text
                return text

            async def openai_stream(p):
                text = ""
                async with client.stream("POST", "/v1/completions", json={
                        "prompt": p, "max_tokens": 12, "temperature": 0, "stream": True}) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data:") and line.strip() != "data: [DONE]":
                            text += json.loads(line[5:])["choices"][0]["text"]
                return text

            jobs = [(tgi_stream if i % 2 else openai_stream)(prompts[i % len(prompts)]) for i in range(32)]
            streamed = await asyncio.gather(*jobs)
            return answers, streamed, before

    answers, streamed, before = asyncio.run(run())
    for i, text in enumerate(streamed):
        assert text == answers[i % len(prompts)], i
    assert server.metrics()["tgi_request_success"] - before == 32


def test_clients_raise_their_own_validation_errors(server):
    import huggingface_hub.errors
    import openai
    import text_generation.errors
    from huggingface_hub import InferenceClient
    from text_generation import Client

    with pytest.raises(text_generation.errors.ValidationError, match="must be <= 1024"):
        Client(server.base_url).generate(PROMPT, max_new_tokens=10**8)
    with pytest.raises(text_generation.errors.ValidationError, match="`stop` supports up to 4"):
        list(Client(server.base_url).generate_stream(PROMPT, stop_sequences=list("abcde")))
    with pytest.raises(huggingface_hub.errors.ValidationError, match="must be <= 1024"):
        InferenceClient(base_url=server.base_url).text_generation(PROMPT, max_new_tokens=10**8)
    with pytest.raises(openai.UnprocessableEntityError) as bad_schema:
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="x").chat.completions.create(
            model="tgi", messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert bad_schema.value.response.json() == {"error": "grammar is not valid: Invalid type: nonsense",
                                                "error_type": "validation"}
    assert Client(server.base_url).generate(PROMPT, max_new_tokens=2).generated_text


CITY_SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon", "Nice"]},
                                                "population": {"type": "integer"}},
               "required": ["city", "population"], "additionalProperties": False}
CITY_MESSAGES = [{"role": "user", "content": "Which French city is on the Riviera? Answer in JSON."}]


def test_structured_output_through_the_clients(server):
    """JSON schemas and regexes over real HTTP: OpenAI `response_format`, TGI `grammar` (both clients)."""
    import jsonschema
    from huggingface_hub import InferenceClient
    from openai import OpenAI
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.chat.completions.create(
        model="tgi", messages=CITY_MESSAGES, temperature=0, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})
    assert r.choices[0].finish_reason == "stop"
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, CITY_SCHEMA)
    # streamed, the same grammar gives the same text
    stream = client.chat.completions.create(
        model="tgi", messages=CITY_MESSAGES, temperature=0, max_tokens=64, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content

    r = client.chat.completions.create(model="tgi", messages=CITY_MESSAGES, temperature=0, max_tokens=200,
                                       response_format={"type": "json_object"})
    content = r.choices[0].message.content
    assert content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)

    tgi = Client(server.base_url).generate(
        "Question: which French city is on the Riviera?\nAnswer (JSON):", max_new_tokens=64,
        grammar=Grammar(type=GrammarType.Json, value=CITY_SCHEMA))
    assert tgi.details.finish_reason == "eos_token"
    jsonschema.validate(json.loads(tgi.generated_text), CITY_SCHEMA)

    date = r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-3]\d"
    hub = InferenceClient(base_url=server.base_url).text_generation(
        "The first moon landing happened on", max_new_tokens=20, grammar={"type": "regex", "value": date})
    assert re.fullmatch(date, hub), hub

    import openai

    with pytest.raises(openai.UnprocessableEntityError) as bad_regex:
        client.chat.completions.create(model="tgi", messages=CITY_MESSAGES, max_tokens=4,
                                       response_format={"type": "regex", "value": "a(b"})
    assert bad_regex.value.response.json()["error"].startswith("grammar is not valid: ")


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                           "parameters": TIME}}]
WEATHER_MESSAGES = [{"role": "user", "content": "What's the weather like in Paris today?"}]


def test_tool_calls_through_the_openai_client(server):
    import jsonschema
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    schemas = {"get_weather": WEATHER, "get_time": TIME}

    def create(**kwargs):
        return client.chat.completions.create(model="tgi", messages=kwargs.pop("messages", WEATHER_MESSAGES),
                                              tools=TOOLS, temperature=0, max_tokens=60, **kwargs)

    r = create(tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])

    named = create(tool_choice={"type": "function", "function": {"name": "get_time"}}).choices[0].message.tool_calls
    assert named[0].function.name == "get_time"
    jsonschema.validate(json.loads(named[0].function.arguments), TIME)

    # streamed: the call arrives whole, equal to the non-streamed one (greedy)
    deltas = [c.choices[0] for c in create(tool_choice="required", stream=True) if c.choices]
    streamed = [t for d in deltas if d.delta.tool_calls for t in d.delta.tool_calls]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == \
        [(0, call.function.name, call.function.arguments)]
    assert deltas[-1].finish_reason == "tool_calls"

    # auto: a call or a plain answer; a plain answer streams as text, never as JSON
    auto = create().choices[0]
    streamed_auto = [c.choices[0] for c in create(stream=True) if c.choices]
    if auto.message.tool_calls:
        jsonschema.validate(json.loads(auto.message.tool_calls[0].function.arguments),
                            schemas[auto.message.tool_calls[0].function.name])
    else:
        assert auto.message.content and not auto.message.content.startswith('{"name"')
        assert "".join(d.delta.content or "" for d in streamed_auto) == auto.message.content
        assert sum(1 for d in streamed_auto if d.delta.content) > 2  # really streamed, not held back

    # the next turn carries the call and its result back; the template gets them as text
    follow_up = WEATHER_MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "cloudy"}'},
    ]
    answer = client.chat.completions.create(model="tgi", messages=follow_up, temperature=0, max_tokens=20)
    assert answer.choices[0].message.content


def test_vllm_extensions_through_the_openai_client(server, prompt_reference):
    """ignore_eos / min_tokens / stop_token_ids / skip_special_tokens, sent the way vLLM clients do."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    ids = prompt_reference[1]
    # stop at the reference's third token: the output is the first three tokens
    r = client.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=N, logprobs=0,
                                  extra_body={"stop_token_ids": [ids[2]]})
    assert r.choices[0].finish_reason == "stop" and len(r.choices[0].logprobs.tokens) == 3
    # held back until min_tokens: the same stop id cannot end it before 5 tokens
    r = client.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=N, logprobs=0,
                                  extra_body={"stop_token_ids": [ids[2]], "min_tokens": 5})
    assert len(r.choices[0].logprobs.tokens) >= 5
    r = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=40,
                                       extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    assert "<|im_end|>" in r.choices[0].message.content  # the EOS it went past, kept in the text


def test_openai_sdk_store_metadata_and_refusal_history(server):
    """The SDK's own fields and an assistant turn echoed back as the SDK returned it (refusal, audio, ...)."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    first = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=8)
    echoed = first.choices[0].message.model_dump()  # role, content, refusal, audio, function_call, ...
    assert "refusal" in echoed
    history = [*MESSAGES, echoed, {"role": "user", "content": "And of Italy?"}]
    r = client.chat.completions.create(model="tgi", messages=history, temperature=0, max_tokens=N, store=True,
                                       metadata={"team": "qa"}, service_tier="auto", user="user-1")
    plain = [*MESSAGES, {"role": "assistant", "content": echoed["content"]}, history[-1]]
    text, tokens = greedy_reference(chat_ids(plain), N)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == len(tokens)
    assert "ignoring unknown fields" in server.log() and "service_tier" in server.log()


def test_openai_agents_sdk_function_tool(server):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no exporter: nothing leaves the machine
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"sunny in {city}"

    model = OpenAIChatCompletionsModel(model="tgi", openai_client=AsyncOpenAI(base_url=server.base_url + "/v1",
                                                                              api_key="unused"))
    agent = Agent(name="weather", instructions="Answer with the get_weather tool.", model=model, tools=[get_weather],
                  model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
                  tool_use_behavior="stop_on_first_tool")
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=2))
    assert len(cities) == 1 and cities[0]
    assert result.final_output == f"sunny in {cities[0]}"


def test_text_generation_client_every_parameter(server):
    from text_generation import Client

    client = Client(server.base_url, timeout=60)
    ids = text_ids(PROMPT)
    kwargs = dict(do_sample=True, max_new_tokens=8, repetition_penalty=1.1, frequency_penalty=0.1,
                  return_full_text=True, seed=3, stop_sequences=["\n\n"], temperature=0.8, top_k=20, top_p=0.9,
                  truncate=100, typical_p=0.95, watermark=False, top_n_tokens=2)
    r = client.generate(PROMPT, decoder_input_details=True, **kwargs)
    assert r.generated_text.startswith(PROMPT) and len(r.generated_text) > len(PROMPT)
    d = r.details
    assert d.seed == 3 and 1 <= d.generated_tokens <= 8 and len(d.tokens) == d.generated_tokens
    assert [p.id for p in d.prefill] == ids and len(d.top_tokens) == d.generated_tokens
    assert all(len(t) == 2 for t in d.top_tokens)
    again = client.generate(PROMPT, decoder_input_details=True, **kwargs)
    assert again.generated_text == r.generated_text  # the seed fixes the draws
    events = list(client.generate_stream(PROMPT, **kwargs))
    assert events[-1].generated_text == r.generated_text
    assert [e.token.id for e in events] == [t.id for t in d.tokens]
    best = client.generate(PROMPT, do_sample=True, max_new_tokens=4, best_of=2)
    assert len(best.details.best_of_sequences) == 1


def test_invocations_both_shapes(server, chat_reference, prompt_reference):
    r = httpx.post(server.base_url + "/invocations", json={"inputs": PROMPT, "parameters": {"max_new_tokens": N}},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == [{"generated_text": prompt_reference[0]}]
    r = httpx.post(server.base_url + "/invocations", json={"messages": MESSAGES, "max_tokens": N, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == chat_reference[0]
    r = httpx.post(server.base_url + "/vertex", json={"instances": [{"inputs": PROMPT, "parameters": {
        "max_new_tokens": N}}, {"messages": MESSAGES, "max_tokens": N, "temperature": 0}]}, timeout=60)
    assert r.json() == {"predictions": [prompt_reference[0], chat_reference[0]]}
    assert httpx.get(server.base_url + "/ping").status_code == 200


def test_vllm_sampling_extensions_on_the_real_model(server, prompt_reference):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    ids = text_ids(PROMPT)
    r = client.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=2,
                                  extra_body={"prompt_logprobs": 1})
    layout = r.choices[0].model_extra["prompt_logprobs"]
    reference = prompt_logprob_reference(ids)
    assert layout[0] is None and len(layout) == len(ids)
    for token, entry, expected in zip(ids[1:], layout[1:], reference[1:], strict=True):
        assert entry[str(token)]["logprob"] == pytest.approx(expected, abs=1e-3)
    # one allowed token: every greedy step must take it
    only = prompt_reference[1][1]
    r = client.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=4, logprobs=0,
                                  extra_body={"allowed_token_ids": [only], "ignore_eos": True})
    assert r.choices[0].logprobs.tokens == [reference_tokenizer().decode([only])] * 4
    # the reference's first word banned: greedy takes something else first
    first_word = reference_tokenizer().decode(prompt_reference[1][:1]).strip()
    r = client.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=4,
                                  extra_body={"bad_words": [first_word]})
    assert not r.choices[0].text.strip().startswith(first_word)
    r = client.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=N,
                                  extra_body={"min_p": 0.5, "include_stop_str_in_output": True})
    assert r.choices[0].text == prompt_reference[0]  # greedy: min_p changes nothing
