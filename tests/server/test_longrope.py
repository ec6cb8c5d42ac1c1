"""Phi-3 LongRoPE beyond the pretraining length, as transformers' generate(): a request no longer than
original_max_position_embeddings is rotated with the short factors, a longer one with the long factors at
every position (transformers drops its cache when a sequence outgrows that length and recomputes it). Greedy
ids equal transformers float32 token for token for prompts shorter than, crossing and longer than that length,
batched, with chunked prefill, n-gram drafts, and a prefix shared by a short and a long request."""

from __future__ import annotations

import pytest
import torch
import transformers
from family_configs import TINY
from model_helpers import SMOLLM2_VOCAB, random_prompts, torch_threads

from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.sampling_params import SamplingParams

ORIGINAL = 32  # original_max_position_embeddings
MAX_NEW = 16
VOCAB = SMOLLM2_VOCAB
HALF_ROTARY = 8  # head_dim 16


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory, smollm2_dir):
    """Two factor sets far apart and large weights: a token rotated with the wrong set changes greedy picks."""
    path = tmp_path_factory.mktemp("phi3-longrope")
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIGINAL,
            "short_factor": [1.0 + 0.1 * i for i in range(HALF_ROTARY)],
            "long_factor": [4.0 + 3.0 * i for i in range(HALF_ROTARY)]}
    config = transformers.Phi3Config(**{**TINY, "vocab_size": VOCAB, "rope_parameters": rope,
                                        "original_max_position_embeddings": ORIGINAL, "initializer_range": 0.2,
                                        "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    model.config.architectures = ["Phi3ForCausalLM"]
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(path)
    return path, model


def reference(hf, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt alone through transformers' generate() with its KV cache."""
    with torch_threads(1), torch.no_grad():
        return [hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def make_engine(model_dir, **overrides) -> LLMEngine:
    settings = dict(model_id=str(model_dir), dtype="float32", max_total_tokens=128, max_batch_total_tokens=4096,
                    max_batch_prefill_tokens=20, num_threads=1)
    return LLMEngine(EngineConfig(**{**settings, **overrides}))


GREEDY = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("speculate", [0, 3])
def test_short_crossing_and_long_prompts_batched_with_chunked_prefill_equal_transformers(phi3_dir, speculate):
    path, hf = phi3_dir
    # 12 stays short; 20, 31 and 32 outgrow the original length while decoding; 33 and 45 start beyond it
    prompts = random_prompts([12, 20, 31, 32, 33, 45])
    engine = make_engine(path, speculate=speculate)
    assert engine.scheduler.config.long_rope_from == ORIGINAL
    assert engine.generate(prompts, GREEDY) == reference(hf, prompts)
    assert engine.scheduler.num_preemptions == 0  # recomputing at the switch is not a preemption


def test_a_prefix_cached_with_one_factor_set_is_not_reused_with_the_other(phi3_dir):
    path, hf = phi3_dir
    prefix = random_prompts([16], seed=2)[0]  # one full block
    short, long = prefix + random_prompts([4], seed=3)[0], prefix + random_prompts([24], seed=4)[0]
    expected = dict(zip(("short", "long"), reference(hf, [short, long]), strict=True))
    engine = make_engine(path)
    kv = engine.kv_cache
    # the short request caches the prefix block (short factors), then outgrows the length and recomputes it
    # (long factors): both are cached, and the long prompt that follows must get the long one
    for i, (name, prompt) in enumerate((("short", short), ("long", long), ("short", short), ("long", long))):
        hits = kv.prefix_cache_hits
        assert engine.generate([prompt], GREEDY) == [expected[name]], name
        assert i == 0 or kv.prefix_cache_hits > hits, name  # blocks of its own factor set hit
    engine = make_engine(path)  # the long prompt first: a short request (staying short) must not take its block
    assert engine.generate([long], GREEDY) == [expected["long"]]
    hits = engine.kv_cache.prefix_cache_hits
    stays_short = SamplingParams(max_new_tokens=ORIGINAL - len(short), ignore_eos=True)
    assert engine.generate([short], stays_short) == [expected["short"][:ORIGINAL - len(short)]]
    assert engine.kv_cache.prefix_cache_hits == hits


def test_prompt_logprobs_stay_the_prompts_own_when_the_request_outgrows_the_length(phi3_dir):
    """The recompute at the switch scores the prompt again, with the long factors; transformers scored it
    with the short ones, and so the first scores stand."""
    path, hf = phi3_dir
    prompt = random_prompts([ORIGINAL], seed=5)[0]
    engine = make_engine(path)
    engine.add_request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True, prompt_logprobs=True))
    scores = None
    while engine.has_unfinished:
        outputs, _ = engine.step()
        scores = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), scores)
    with torch_threads(1), torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    expected = logits.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert scores[0] is None
    torch.testing.assert_close(torch.tensor(scores[1:], dtype=torch.float32), expected, atol=1e-4, rtol=1e-4)
