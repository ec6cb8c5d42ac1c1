"""The transformers fallback runs several requests per forward and stays exact: greedy ids equal
transformers float32 generate for architectures genserve has no native model for (GPT-J, OPT, Falcon
with ALiBi), with requests joining while others decode, chunked prefill, preemption, prompt
log-probabilities, the one-at-a-time switch, and 8 requests in flight over real HTTP."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import transformers
from http_server import start_server
from model_helpers import SMOLLM2_VOCAB, random_prompts, torch_threads

from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.fallback_runner import BATCHING_ENV, group_rows
from genserve.server.models import get_model_class
from genserve.server.sampling_params import SamplingParams
from genserve.server.scheduler import ScheduledRequest

VOCAB = SMOLLM2_VOCAB
EOS = 2
FAMILIES = {
    "gptj": lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                                            rotary_dim=8, initializer_range=0.3),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, max_position_embeddings=1024, hidden_size=64,
                                          ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                          word_embed_proj_dim=64, init_std=0.3, pad_token_id=1),
    "falcon-alibi": lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, alibi=True, initializer_range=0.3,
                                                      max_position_embeddings=1024),
}
MAX_NEW = 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def save_family(path, family: str, tokenizer_dir):
    config = FAMILIES[family]()
    config.eos_token_id, config.bos_token_id = EOS, 1
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert get_model_class([type(hf).__name__]) is None, f"{family} is native now: pick another family"
    hf.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return hf


def reference(hf, prompts: list[list[int]], max_new: int = MAX_NEW, stop_at_eos: bool = False) -> list[list[int]]:
    out = []
    for p in prompts:
        kwargs = {"eos_token_id": EOS} if stop_at_eos else {"min_new_tokens": max_new}
        ids = hf.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                          **kwargs)[0, len(p):].tolist()
        out.append(ids[:ids.index(EOS) + 1] if stop_at_eos and EOS in ids else ids)
    return out


def make_engine(model_dir, **overrides) -> LLMEngine:
    settings = dict(model_id=str(model_dir), dtype="float32", max_total_tokens=256, max_batch_total_tokens=8192,
                    max_batch_prefill_tokens=48, num_threads=1)
    return LLMEngine(EngineConfig(**{**settings, **overrides}))


def record_batch_sizes(engine) -> list[int]:
    sizes, forward = [], engine.runner.model.forward_batch

    def recording(chunks, *args, **kwargs):
        sizes.append(len(chunks))
        return forward(chunks, *args, **kwargs)

    engine.runner.model.forward_batch = recording
    return sizes


def run_arriving(engine, prompts, params) -> list[list[int]]:
    """One new request per step: each joins while the earlier ones decode."""
    ids, tokens = [], {}
    for step in range(10_000):
        if step < len(prompts):
            ids.append(engine.add_request(prompts[step], params))
        elif not engine.has_unfinished:
            break
        for o in engine.step()[0]:
            tokens.setdefault(o.request_id, []).extend(t.id for t in o.new_tokens)
    return [tokens[i] for i in ids]


def scheduled(num_new: list[int]) -> list[ScheduledRequest]:
    return [ScheduledRequest(request=None, num_new_tokens=n) for n in num_new]


def test_group_rows_keeps_decodes_together_and_prompts_of_similar_length():
    groups = group_rows(scheduled([1, 40, 1, 38, 5, 1]), max_rows=8)
    assert [[s.num_new_tokens for s in g] for g in groups] == [[1, 1, 1], [40, 38], [5]]
    assert [len(g) for g in group_rows(scheduled([1] * 5), max_rows=2)] == [2, 2, 1]
    assert [len(g) for g in group_rows(scheduled([1, 3, 1]), max_rows=1)] == [1, 1, 1]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, save_family(path, request.param, smollm2_dir)


def test_requests_joining_mid_decode_with_chunked_prefill_equal_transformers(family):
    _, path, hf = family
    prompts = random_prompts([5, 70, 12, 1, 50, 7, 22, 3])  # 70 and 50 take two or more prefill chunks
    engine = make_engine(path)
    assert engine.model_path_kind == "transformers" and engine.runner.is_batching
    sizes = record_batch_sizes(engine)
    assert run_arriving(engine, prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)) == reference(
        hf, prompts)
    assert max(sizes) >= 6, sizes  # the decodes of all but the newest requests shared a forward
    assert not engine.runner.homes and engine.kv_cache.num_used_blocks == 0


def test_preempted_requests_recompute_and_stay_exact(family):
    _, path, hf = family
    prompts = random_prompts([20, 18, 25, 16, 22, 19], seed=2)
    engine = make_engine(path, max_batch_total_tokens=96, block_size=16, max_batch_prefill_tokens=64)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert got == reference(hf, prompts, max_new=24)


def test_a_request_aborted_mid_decode_leaves_the_others_exact(family):
    _, path, hf = family
    prompts = random_prompts([8, 15, 4, 11], seed=6)
    engine = make_engine(path)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    for step in range(10_000):
        if step == 3:
            engine.abort(ids[1])  # its row leaves the shared cache; the next forward regathers the rest
        if not engine.has_unfinished:
            break
        for o in engine.step()[0]:
            tokens[o.request_id].extend(t.id for t in o.new_tokens)
    expected = reference(hf, prompts)
    assert [tokens[i] for i in ids[:1] + ids[2:]] == expected[:1] + expected[2:]
    assert 0 < len(tokens[ids[1]]) < MAX_NEW and tokens[ids[1]] == expected[1][:len(tokens[ids[1]])]
    assert not engine.runner.homes


def test_prompt_logprobs_in_a_batched_prefill_equal_transformers(family):
    _, path, hf = family
    prompts = random_prompts([9, 11, 10], seed=3)
    engine = make_engine(path)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=True)
    ids = [engine.add_request(p, params) for p in prompts]
    scores = {}
    while engine.has_unfinished:
        for o in engine.step()[0]:
            if o.prompt_logprobs is not None:
                scores[o.request_id] = o.prompt_logprobs
    for rid, prompt in zip(ids, prompts, strict=True):
        with torch.no_grad():
            logprobs = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
        expected = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
        assert scores[rid][0] is None
        torch.testing.assert_close(torch.tensor(scores[rid][1:], dtype=torch.float64), expected.double(), rtol=0, atol=1e-4)


def test_one_at_a_time_switch_gives_the_same_tokens(family, monkeypatch):
    _, path, hf = family
    monkeypatch.setenv(BATCHING_ENV, "0")
    engine = make_engine(path)
    assert not engine.runner.is_batching
    sizes = record_batch_sizes(engine)
    prompts = random_prompts([6, 3, 9], seed=4)
    assert run_arriving(engine, prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)) == reference(
        hf, prompts)
    assert set(sizes) == {1}


# ---- over HTTP --------------------------------------------------------------------------------

HTTP_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
                "In a galaxy far away", "SELECT * FROM", "The quick brown fox", "Dear Sir or Madam,"]


@pytest.fixture(scope="module")
def gptj_server(tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp("gptj-http")
    hf = save_family(path, "gptj", smollm2_dir)
    server = start_server(tmp_path_factory.mktemp("serve-gptj"), "--model-id", str(path), "--max-batch-size", "16")
    yield server, hf
    server.stop()


def test_eight_requests_in_flight_over_http_equal_transformers(gptj_server, smollm2_dir):
    server, hf = gptj_server
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    info = httpx.get(server.base_url + "/info", timeout=10).json()
    assert info["model_path_kind"] == "transformers"
    assert "model path: transformers" in server.log()
    first_tokens = threading.Barrier(5, timeout=300)  # the four streams' first tokens, then the rest are sent

    def stream(prompt: str) -> list[int]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW}}
        ids = []
        with httpx.stream("POST", server.base_url + "/generate_stream", json=body, timeout=300) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    ids.append(json.loads(line[5:])["token"]["id"])
                    if len(ids) == 1:
                        first_tokens.wait()
        return ids

    def generate(prompt: str) -> list[int]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
        response = httpx.post(server.base_url + "/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["details"]["tokens"]]

    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream, p) for p in HTTP_PROMPTS[:4]]
        first_tokens.wait()  # the first four are decoding when the next four arrive
        later = [pool.submit(generate, p) for p in HTTP_PROMPTS[4:]]
        got = [f.result() for f in streams + later]
    prompts = [tokenizer.encode(p) for p in HTTP_PROMPTS]
    assert got == reference(hf, prompts, stop_at_eos=True)


@pytest.mark.parametrize("batching", ["1", "0"])
def test_sliding_window_through_the_fallback_equals_transformers(tmp_path, smollm2_dir, monkeypatch, batching):
    """Batched rows keep every key (full layers) and the mask applies the window; alone, a request keeps
    the sliding layers its config asks for. Contexts run well past the window either way."""
    monkeypatch.setenv(BATCHING_ENV, batching)
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                        sliding_window=8, initializer_range=0.3, eos_token_id=EOS, bos_token_id=1)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path)
    engine = make_engine(tmp_path, use_transformers_fallback=True)
    assert engine.runner.is_batching == (batching == "1")
    prompts = random_prompts([20, 5, 33, 12], seed=5)
    assert run_arriving(engine, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True)) == reference(
        hf, prompts, max_new=12)
