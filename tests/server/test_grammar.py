"""Constrained decoding on the real model: JSON schemas and regexes, checked against transformers' greedy
decoding under the same constraint (llguidance applied as a LogitsProcessor), batched with free requests."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.grammar import GrammarSpec
from genserve.server.sampling_params import SamplingParams

llguidance = pytest.importorskip("llguidance")
pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                   "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "maxItems": 3}},
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon", "Nice"]}, "population": {"type": "number"}},
        "required": ["city", "population"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
          "additionalProperties": False}
DATE = r"20\d\d-(0[1-9]|1[0-2])-[0-3]\d"
MAX_NEW = 48


class ReferenceGrammar(LogitsProcessor):
    """llguidance used directly, the way a transformers user would: mask the logits before each greedy pick."""

    def __init__(self, tokenizer, spec: GrammarSpec, prompt_len: int) -> None:
        import llguidance.hf

        ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        if spec.kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                spec.value, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        else:
            grammar = llguidance.LLMatcher.grammar_from_regex(llguidance.regex_to_lark(spec.value, "dws"))
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        self.vocab = ll_tokenizer.vocab_size
        self.prompt_len = prompt_len
        self.consumed = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[0, self.prompt_len:].tolist()
        for token in generated[self.consumed:]:
            assert self.matcher.consume_token(token), self.matcher.get_error()
        self.consumed = len(generated)
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        mask = self.matcher.compute_bitmask()
        words = torch.frombuffer(bytearray(mask), dtype=torch.int32)
        bits = ((words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten().bool()[:self.vocab]
        allowed[:bits.shape[0]] = bits[:scores.shape[-1]]
        return scores.masked_fill(~allowed, float("-inf"))


def strip_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return LLMEngine(EngineConfig(model_id=str(smollm2_dir), dtype="float32", max_total_tokens=512,
                                  max_batch_total_tokens=8192, max_batch_prefill_tokens=512))


def chat(tokenizer, text: str) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(prompt)


@pytest.fixture(scope="module")
def cases(tokenizer):
    """(prompt ids, grammar or None); the free ones check that masking one row leaves the others alone."""
    return [
        (chat(tokenizer, "Describe a software engineer as JSON."), GrammarSpec.json_schema(PERSON)),
        (chat(tokenizer, "Which French city is on the Riviera?"), GrammarSpec.json_schema(CITY)),
        (chat(tokenizer, "When did the first moon landing happen?"), GrammarSpec.regex(DATE)),
        (chat(tokenizer, "Name a primary color."), None),
        (chat(tokenizer, "Is the sky blue? Answer in JSON."), GrammarSpec.json_schema(ANSWER)),
        (tokenizer.encode("The capital of Italy is"), None),
    ]


@pytest.fixture(scope="module")
def reference(smollm2_dir, tokenizer, cases):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    outputs = []
    for ids, spec in cases:
        processors = LogitsProcessorList([ReferenceGrammar(tokenizer, spec, len(ids))]) if spec else None
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, logits_processor=processors)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


def test_constrained_greedy_matches_transformers_batched_with_free_requests(engine, tokenizer, cases, reference):
    params = [SamplingParams(max_new_tokens=MAX_NEW, grammar=spec) for _, spec in cases]
    outputs = engine.generate([ids for ids, _ in cases], params)
    eos = tokenizer.eos_token_id
    for (_, spec), ours, theirs in zip(cases, outputs, reference, strict=True):
        if spec is None:
            assert ours == theirs  # untouched by the grammars beside it
        else:
            # we end the request as soon as the grammar is complete; transformers spends one more step on EOS
            assert strip_eos(ours, eos) == strip_eos(theirs, eos)
    texts = [tokenizer.decode(strip_eos(o, eos)) for o in outputs]
    jsonschema.validate(json.loads(texts[0]), PERSON)
    jsonschema.validate(json.loads(texts[1]), CITY)
    assert re.fullmatch(DATE, texts[2]), texts[2]
    jsonschema.validate(json.loads(texts[4]), ANSWER)
    assert engine.kv_cache.num_used_blocks == 0


def test_finished_grammar_ends_with_eos_token_reason(engine, tokenizer, cases):
    ids, spec = cases[1]
    engine.add_request(ids, SamplingParams(max_new_tokens=MAX_NEW, grammar=spec))
    finals = []
    while engine.has_unfinished:
        finals += [o for o in engine.step()[0] if o.finished]
    assert finals[0].finish_reason == "eos_token"
    jsonschema.validate(json.loads(finals[0].generated_text), CITY)


def test_seeded_sampling_under_a_grammar_is_valid_and_reproducible(engine, tokenizer, cases):
    ids = cases[0][0]
    spec = GrammarSpec.json_schema(PERSON)
    sampled = [SamplingParams(max_new_tokens=96, do_sample=True, temperature=1.3, seed=seed, grammar=spec)
               for seed in range(4)]
    alone = [engine.generate([ids], p)[0] for p in sampled]
    busy = engine.generate([ids] * 4 + [c[0] for c in cases], sampled + [SamplingParams(max_new_tokens=MAX_NEW)] * 6)
    assert busy[:4] == alone
    finished = 0
    for tokens in alone:
        text = tokenizer.decode(strip_eos(tokens, tokenizer.eos_token_id))
        if len(tokens) < 96:  # a sample that ran out of tokens is cut short, not wrong
            jsonschema.validate(json.loads(text), PERSON)
            finished += 1
    assert finished >= 2
    assert len({tuple(t) for t in alone}) > 1  # the seeds really explore the grammar


@pytest.mark.parametrize("spec, fragment", [
    (GrammarSpec("regex", "a(b"), "error: unclosed group"),  # the cause, from the last diagnostic line
    (GrammarSpec("json", json.dumps({"type": "nonsense"})), "grammar is not valid: Invalid type: nonsense"),
    (GrammarSpec("json", json.dumps({"type": "string", "pattern": "(("})), "grammar is not valid: "),
    (GrammarSpec("lark", "start: x"), "grammar is not valid: unknown type `lark`"),
])
def test_invalid_grammar_is_refused_and_leaves_others_running(engine, tokenizer, cases, reference, spec, fragment):
    ids, _ = cases[3]
    running = engine.add_request(ids, SamplingParams(max_new_tokens=MAX_NEW))
    tokens = [t.id for o in engine.step()[0] for t in o.new_tokens]
    with pytest.raises(ValueError, match=re.escape(fragment)):
        engine.add_request(ids, SamplingParams(max_new_tokens=8, grammar=spec))
    while engine.has_unfinished:
        tokens += [t.id for o in engine.step()[0] if o.request_id == running for t in o.new_tokens]
    assert tokens == reference[3]


def test_spec_constructors_reject_non_schemas():
    with pytest.raises(ValueError, match="a JSON schema must be an object"):
        GrammarSpec.json_schema([1, 2])
    with pytest.raises(ValueError, match="the JSON schema is not JSON"):
        GrammarSpec.json_schema("{nope")
    with pytest.raises(ValueError, match="needs a non-empty string"):
        GrammarSpec.regex("")
    # the schema's key order is kept: properties are generated in the order the client gave
    assert GrammarSpec.json_schema({"b": 1, "a": 2}).value == '{"b": 1, "a": 2}'


def test_disabled_grammar_support(smollm2_dir, tokenizer):
    engine = LLMEngine(EngineConfig(model_id=str(smollm2_dir), dtype="float32", max_total_tokens=256,
                                    max_batch_total_tokens=1024, disable_grammar_support=True))
    with pytest.raises(ValueError, match="^grammar is not supported$"):
        engine.add_request(tokenizer.encode("hi"), SamplingParams(max_new_tokens=4, grammar=GrammarSpec.regex("a+")))
