"""Prompt log-probabilities (TGI decoder_input_details, OpenAI echo + logprobs) against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends.",
    "Paris is the capital of",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(smollm2_dir, prompts):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    out = []
    with torch.inference_mode():
        for ids in prompts:
            logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            out.append([None] + logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist())
    return out


def run(engine: LLMEngine, prompts, params: list[SamplingParams]) -> dict[str, list]:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    found: dict[str, list] = {}
    cached: dict[str, int] = {}
    while engine.has_unfinished:
        for out in engine.step()[0]:
            if out.prompt_logprobs is not None:
                found[out.request_id] = out.prompt_logprobs
            cached[out.request_id] = out.num_cached_tokens
    return [found.get(i) for i in ids], [cached[i] for i in ids]


def assert_close(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs) and ours[0] is None and theirs[0] is None
    torch.testing.assert_close(torch.tensor(ours[1:]), torch.tensor(theirs[1:]), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("fallback", [False, True], ids=["native", "transformers-fallback"])
def test_prompt_logprobs_match_transformers_in_chunks_beside_other_requests(smollm2_dir, prompts, reference,
                                                                            fallback):
    # 16-token prefill budget: the long prompts are scored across several chunks and steps
    engine = LLMEngine(EngineConfig(model_id=str(smollm2_dir), dtype="float32", max_total_tokens=256,
                                    max_batch_total_tokens=4096, max_batch_prefill_tokens=16,
                                    use_transformers_fallback=fallback))
    want = SamplingParams(max_new_tokens=3, prompt_logprobs=True)
    plain = SamplingParams(max_new_tokens=3)
    found, _ = run(engine, prompts + prompts[:1], [want, want, want, plain])
    for ours, theirs in zip(found[:3], reference, strict=True):
        assert_close(ours, theirs)
    assert found[3] is None  # not asked for, not computed


def test_a_one_token_prompt_chunk_is_scored_too(smollm2_dir, prompts, reference):
    # 16-token budget: a 15-token request leaves exactly one token of the next prompt for the first step,
    # which then runs as a one-token chunk beside the decodes
    engine = LLMEngine(EngineConfig(model_id=str(smollm2_dir), dtype="float32", max_total_tokens=256,
                                    max_batch_total_tokens=4096, max_batch_prefill_tokens=16))
    filler = prompts[0][:15]
    found, _ = run(engine, [filler, prompts[0]], [SamplingParams(max_new_tokens=3),
                                                  SamplingParams(max_new_tokens=3, prompt_logprobs=True)])
    assert_close(found[1], reference[0])


def test_top_alternatives_of_each_prompt_token(smollm2_dir, prompts, reference):
    engine = LLMEngine(EngineConfig(model_id=str(smollm2_dir), dtype="float32", max_total_tokens=256,
                                    max_batch_total_tokens=4096))
    request_id = engine.add_request(prompts[1], SamplingParams(max_new_tokens=1, prompt_logprobs=True,
                                                               top_n_tokens=3))
    out = next(o for o in engine.step()[0] if o.request_id == request_id)
    assert out.prompt_top_tokens[0] == []  # nothing to condition the first token on
    for position, (tops, logprob) in enumerate(zip(out.prompt_top_tokens[1:], out.prompt_logprobs[1:],
                                                   strict=True), start=1):
        assert len(tops) == 3 and tops[0].logprob >= tops[1].logprob >= tops[2].logprob
        # the prompt token itself is either among them or less likely than the third
        actual = prompts[1][position]
        assert any(t.id == actual and abs(t.logprob - logprob) < 1e-5 for t in tops) or logprob <= tops[2].logprob


def test_prompt_logprobs_never_come_from_the_prefix_cache(smollm2_dir, prompts, reference):
    engine = LLMEngine(EngineConfig(model_id=str(smollm2_dir), dtype="float32", max_total_tokens=256,
                                    max_batch_total_tokens=4096))
    _, cached = run(engine, prompts[:1], [SamplingParams(max_new_tokens=2)])
    # the same prompt again: a plain request reuses its blocks, one asking for prompt logprobs computes them all
    found, cached = run(engine, prompts[:1] * 2, [SamplingParams(max_new_tokens=2),
                                                  SamplingParams(max_new_tokens=2, prompt_logprobs=True)])
    assert cached[0] > 0 and cached[1] == 0
    assert_close(found[1], reference[0])
