"""The engine end to end on real weights: greedy parity with transformers, batching, preemption,
prefix caching, seeded sampling and input validation."""

from __future__ import annotations

import pytest
import torch
from model_helpers import save_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from genserve.server import kernels
from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.sampling_params import SamplingParams

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Write a haiku about autumn leaves falling on a quiet pond in the early morning light.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "What is the meaning of life? Explain in detail, considering philosophy, religion, science, "
    "and the everyday experience of ordinary people who have thought about it for a long time.",
    "Once upon a time",
    "Q: What is 2+2?\nA:",
]
MAX_NEW = 16


def reference_greedy(model_dir, prompts_ids, max_new=MAX_NEW):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    for ids in prompts_ids:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


def make_engine(model_dir, **overrides) -> LLMEngine:
    settings = dict(model_id=str(model_dir), dtype="float32", max_total_tokens=512, max_input_tokens=400,
                    max_batch_total_tokens=8192, max_batch_prefill_tokens=512, waiting_served_ratio=0.0)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def run_staggered(engine, prompts_ids, params, first_batch=4, steps_between=3):
    """Submit some requests, step a few times, then submit the rest mid-flight."""
    ids = [engine.add_request(p, params) for p in prompts_ids[:first_batch]]
    tokens = {}
    for _ in range(steps_between):
        for o, _ in [(o, None) for o in engine.step()[0]]:
            tokens.setdefault(o.request_id, []).extend(t.id for t in o.new_tokens)
    ids += [engine.add_request(p, params) for p in prompts_ids[first_batch:]]
    while engine.has_unfinished:
        for o in engine.step()[0]:
            tokens.setdefault(o.request_id, []).extend(t.id for t in o.new_tokens)
    return [tokens[i] for i in ids]


@pytest.fixture(scope="module")
def smol_prompts(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def smol_reference(smollm2_dir, smol_prompts):
    return reference_greedy(smollm2_dir, smol_prompts)


@pytest.fixture(scope="module")
def smol_engine(smollm2_dir):
    return make_engine(smollm2_dir)


@pytest.mark.slow
def test_greedy_one_at_a_time_matches_transformers(smol_engine, smol_prompts, smol_reference):
    for ids, ref in zip(smol_prompts, smol_reference, strict=True):
        assert smol_engine.generate([ids], SamplingParams(max_new_tokens=MAX_NEW))[0] == ref


@pytest.mark.slow
@pytest.mark.parametrize("decode_path", ["native-kernel", "gather-sdpa"])
def test_greedy_batched_with_mid_flight_arrivals_matches_transformers(smol_engine, smol_prompts, smol_reference,
                                                                      decode_path):
    runner = smol_engine.runner
    if decode_path == "native-kernel" and not kernels.load_cpu_kernels():
        pytest.skip("no C++ toolchain to build the kernel")
    # both CPU decode paths must give transformers' tokens: the kernel, and the fallback without a compiler
    default = runner.use_paged_kernel
    runner.use_paged_kernel = decode_path == "native-kernel"
    try:
        outputs = run_staggered(smol_engine, smol_prompts, SamplingParams(max_new_tokens=MAX_NEW))
    finally:
        runner.use_paged_kernel = default
    assert outputs == smol_reference
    assert smol_engine.kv_cache.num_used_blocks == 0


@pytest.mark.slow
def test_greedy_under_preemption_matches_transformers(smollm2_dir, smol_prompts, smol_reference):
    # 12 blocks of 16 tokens cannot hold 8 requests of up to ~45 tokens: the newest get preempted
    engine = make_engine(smollm2_dir, max_batch_total_tokens=192, max_total_tokens=192, max_input_tokens=100)
    outputs = run_staggered(engine, smol_prompts, SamplingParams(max_new_tokens=MAX_NEW))
    assert engine.stats().num_preemptions_total > 0
    assert outputs == smol_reference
    assert engine.kv_cache.num_used_blocks == 0


@pytest.mark.slow
def test_prefix_cache_computes_only_new_tokens(smollm2_dir, smol_engine):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    shared = "You are a careful assistant. " * 12
    first, second = tok.encode(shared + "Name a color."), tok.encode(shared + "Name a fruit.")
    smol_engine.generate([first], SamplingParams(max_new_tokens=4))
    before = smol_engine.stats()
    out = smol_engine.generate([second], SamplingParams(max_new_tokens=4))[0]
    after = smol_engine.stats()
    computed = after.num_computed_prompt_tokens_total - before.num_computed_prompt_tokens_total
    hits = after.prefix_cache_hits_total - before.prefix_cache_hits_total
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert hits == (common // 16) * 16 and hits >= 64
    assert computed == len(second) - hits
    assert out == reference_greedy(smollm2_dir, [second], max_new=4)[0]


@pytest.mark.slow
def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(smol_engine, smol_prompts):
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.95, top_k=50,
                            seed=1234, ignore_eos=True)
    alone = smol_engine.generate([smol_prompts[0]], params)[0]
    busy_params = [SamplingParams(max_new_tokens=12, do_sample=True, seed=i, ignore_eos=True) for i in range(6)]
    batch = smol_engine.generate(smol_prompts[1:7] + [smol_prompts[0]], busy_params + [params])
    assert batch[-1] == alone
    other_seed = SamplingParams(**{**{f: getattr(params, f) for f in params.__slots__}, "seed": 99})
    assert smol_engine.generate([smol_prompts[0]], other_seed)[0] != alone


@pytest.mark.slow
def test_bad_input_raises_tgi_errors_and_leaves_others_running(smol_engine, smol_prompts, smol_reference):
    good = smol_engine.add_request(smol_prompts[1], SamplingParams(max_new_tokens=MAX_NEW))
    tokens = [t.id for o in smol_engine.step()[0] if o.request_id == good for t in o.new_tokens]
    cases = [
        ([], SamplingParams(), "`inputs` cannot be empty"),
        ([1] * 401, SamplingParams(), "`inputs` must have less than 400 tokens. Given: 401"),
        ([1] * 10, SamplingParams(max_new_tokens=600),
         "`inputs` tokens + `max_new_tokens` must be <= 512. Given: 10 `inputs` tokens and 600 `max_new_tokens`"),
        ([1] * 10, SamplingParams(temperature=-1), "`temperature` must be strictly positive"),
        ([1] * 10, SamplingParams(top_p=1.5), "`top_p` must be > 0.0 and < 1.0"),
        ([1] * 10, SamplingParams(repetition_penalty=0), "`repetition_penalty` must be strictly positive"),
        ([1] * 10, SamplingParams(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
        ([1] * 10, SamplingParams(stop=["a", "b", "c", "d", "e"]), "`stop` supports up to 4 stop sequences. Given: 5"),
        ([1] * 10, SamplingParams(top_n_tokens=9), "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
    ]
    for ids, params, message in cases:
        with pytest.raises(ValueError) as err:
            smol_engine.add_request(ids, params)
        assert str(err.value) == message
    while smol_engine.has_unfinished:
        tokens += [t.id for o in smol_engine.step()[0] if o.request_id == good for t in o.new_tokens]
    assert tokens == smol_reference[1]


@pytest.mark.slow
def test_stop_sequence_and_details(smol_engine, smol_prompts, smol_reference, smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    full_text = tok.decode(smol_reference[3], skip_special_tokens=True)  # " 5, 6, 7, ..."
    stop = "7,"
    rid = smol_engine.add_request(smol_prompts[3], SamplingParams(max_new_tokens=MAX_NEW, stop=[stop]))
    outputs = []
    while smol_engine.has_unfinished:
        outputs += [o for o in smol_engine.step()[0] if o.request_id == rid]
    last = outputs[-1]
    assert last.finished and last.finish_reason == "stop_sequence" and last.matched_stop == stop
    assert last.generated_text == full_text[: full_text.index(stop)]
    assert "".join(o.text_delta for o in outputs) == last.generated_text
    assert all(t.logprob <= 0 for o in outputs for t in o.new_tokens)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A random Llama with GQA (4 heads, 2 KV heads) sharing SmolLM2's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir, num_kv_heads=2)


@pytest.mark.parametrize("fallback", [False, True], ids=["native", "transformers-fallback"])
def test_tiny_gqa_llama_matches_transformers_batched_and_preempted(tiny_llama_dir, smol_prompts, fallback):
    reference = reference_greedy(tiny_llama_dir, smol_prompts)
    engine = make_engine(tiny_llama_dir, use_transformers_fallback=fallback)
    assert run_staggered(engine, smol_prompts, SamplingParams(max_new_tokens=MAX_NEW)) == reference
    small = make_engine(tiny_llama_dir, use_transformers_fallback=fallback, max_batch_total_tokens=192,
                        max_total_tokens=192, max_input_tokens=100)
    assert run_staggered(small, smol_prompts, SamplingParams(max_new_tokens=MAX_NEW)) == reference
    assert small.stats().num_preemptions_total > 0


@pytest.mark.slow
def test_logit_bias_matches_transformers_sequence_bias(smollm2_dir, smol_engine, smol_prompts, smol_reference):
    ids = smol_prompts[1]
    # ban the token transformers picks first and favour another one mildly
    bias = {smol_reference[1][0]: -100.0, smol_reference[1][1]: 2.5}
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    expected = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                              sequence_bias={(t,): b for t, b in bias.items()})[0, len(ids):].tolist()
    assert smol_engine.generate([ids], SamplingParams(max_new_tokens=MAX_NEW, logit_bias=bias))[0] == expected
    assert expected[0] != smol_reference[1][0]
    with pytest.raises(ValueError, match="`logit_bias` token ids must be in"):
        smol_engine.add_request(ids, SamplingParams(max_new_tokens=2, logit_bias={10**7: 1.0}))


@pytest.mark.slow
def test_min_tokens_matches_transformers_min_new_tokens(smollm2_dir, smol_engine):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=False,
                                             add_generation_prompt=True))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    plain = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
    assert len(plain) < 60  # it stops on its own (EOS)...
    at_least = len(plain) + 4
    longer = model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=at_least,
                            do_sample=False)[0, len(ids):].tolist()
    ours = smol_engine.generate([ids], SamplingParams(max_new_tokens=64, min_tokens=at_least))[0]
    assert ours == longer and len(ours) >= at_least  # ...and not before `at_least` tokens with min_tokens
    with pytest.raises(ValueError, match="`stop_token_ids` must be in"):
        smol_engine.add_request(ids, SamplingParams(max_new_tokens=2, stop_token_ids=[-1]))
