"""Benchmark prompts: synthetic ones of an exact token length, JSONL datasets, request bodies per API."""

from __future__ import annotations

import json

import pytest

from genserve.server.benchmark.client import build_body
from genserve.server.benchmark.config import RequestConfig, WorkloadConfig
from genserve.server.benchmark.workload import Prompt, SyntheticPrompts, Workload, load_dataset


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_synthetic_prompts_have_the_exact_length(tokenizer):
    gen = SyntheticPrompts(tokenizer, seed=0)
    for n in (1, 16, 200):
        prompts = [gen.make(n, 4) for _ in range(3)]
        assert [len(tokenizer.encode(p.text, add_special_tokens=False)) for p in prompts] == [n] * 3
        assert all(p.input_tokens == n and p.output_tokens == 4 for p in prompts)
        assert len({p.text for p in prompts}) == 3  # no shared prefixes for a cache to reuse
    assert SyntheticPrompts(tokenizer, seed=5).make(32, 1) == SyntheticPrompts(tokenizer, seed=5).make(32, 1)


def test_dataset_rows_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "hi", "output_tokens": 3}, {"messages": [{"role": "user", "content": "yo"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_dataset(path, default_output_tokens=9)
    assert prompts == [Prompt(text="hi", output_tokens=3), Prompt(messages=rows[1]["messages"], output_tokens=9)]
    workload = Workload(WorkloadConfig(dataset=str(path), output_tokens=9))
    assert workload.peek(1) == prompts[:1]
    assert workload.take(3) == [prompts[0], prompts[1], prompts[0]] and workload.take(1) == [prompts[1]]
    for bad, message in (("{", "not JSON"), ('{"text": 1}', '"prompt"'), ('{"prompt": "a", "output_tokens": 0}',
                                                                         "output_tokens")):
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=message):
            load_dataset(path, 1)


def test_request_bodies():
    rc = RequestConfig(model="m", extra_body={"top_k": 5})
    text, chat = Prompt(text="hello", output_tokens=4), Prompt(messages=[{"role": "user", "content": "x"}])
    assert build_body("completions", text, rc) == {
        "model": "m", "prompt": "hello", "max_tokens": 4, "stream": True, "temperature": 0.0, "ignore_eos": True,
        "stream_options": {"include_usage": True}, "top_k": 5}
    assert build_body("chat", text, rc)["messages"] == [{"role": "user", "content": "hello"}]
    assert build_body("chat", chat, rc)["messages"] == chat.messages
    # TGI has no ignore_eos: its outputs may stop at EOS before max_new_tokens
    assert build_body("tgi", text, RequestConfig(temperature=0.7)) == {
        "inputs": "hello", "stream": True,
        "parameters": {"max_new_tokens": 4, "details": True, "do_sample": True, "temperature": 0.7}}
    for api in ("completions", "tgi"):
        with pytest.raises(ValueError, match="--api chat"):
            build_body(api, chat, rc)
    with pytest.raises(ValueError, match="api must be one of"):
        RequestConfig(api="grpc")
