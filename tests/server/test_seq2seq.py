"""Encoder-decoder models (T5, BART) are served exactly: greedy ids equal transformers float32
`AutoModelForSeq2SeqLM.generate`, with requests joining mid-decode, chunked prefill, preemption and
abort, every request of a step in one decoder forward, and over real HTTP through /generate,
/generate_stream and /v1/completions (chat answers 422: these models have no chat template).

The native path (models/bart.py, models/t5.py; decoder self-attention K/V in the paged pool) serves
both families; BART's head_dim 64 decodes through the native paged kernel, T5's relative position
bias through the gather path. The transformers runner (--use-transformers-fallback, unknown variants)
keeps its own tests at the end of the engine tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from http_server import start_server
from model_helpers import SMOLLM2_VOCAB, random_prompts, torch_threads

from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.fallback_runner import BATCHING_ENV
from genserve.server.sampling_params import SamplingParams

VOCAB = SMOLLM2_VOCAB
EOS = 2
MAX_NEW = 10
FAMILIES = {
    # T5: relative position bias, decoder starts from the pad token
    "t5": lambda **kw: transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                        pad_token_id=0, eos_token_id=EOS, decoder_start_token_id=0,
                                        initializer_factor=3.0, **kw),
    # BART: learned positions in both stacks, decoder starts from eos; no forced bos/eos (TGI applies none);
    # head_dim 64: the native paged kernel decodes it; scaled embeddings
    "bart": lambda **kw: transformers.BartConfig(vocab_size=VOCAB, d_model=128, encoder_layers=2, decoder_layers=2,
                                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                            decoder_ffn_dim=64, max_position_embeddings=1024, pad_token_id=1,
                                            bos_token_id=0, eos_token_id=EOS, decoder_start_token_id=EOS,
                                            forced_bos_token_id=None, forced_eos_token_id=None, init_std=0.1,
                                            scale_embedding=True, **kw),
}
# T5 v1.1 / Flan: gated-gelu feed-forward, no output rescale (the config's tie_word_embeddings=False)
T5_GATED = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def save_family(path, family: str, tokenizer_dir, **overrides):
    torch.manual_seed(0)
    hf = transformers.AutoModelForSeq2SeqLM.from_config(FAMILIES[family](**overrides)).eval()
    hf.save_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = None  # like t5-small / bart-large: no chat template
    tokenizer.save_pretrained(path)
    return hf


def reference(hf, prompts: list[list[int]], max_new: int = MAX_NEW, stop_at_eos: bool = False) -> list[list[int]]:
    """transformers' greedy generate; the decoder start token it returns first is not a generated token."""
    out = []
    for p in prompts:
        kwargs = {"eos_token_id": EOS} if stop_at_eos else {"min_new_tokens": max_new}
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, **kwargs)[0, 1:].tolist()
        out.append(ids[:ids.index(EOS) + 1] if stop_at_eos and EOS in ids else ids)
    return out


def make_engine(model_dir, **overrides) -> LLMEngine:
    settings = dict(model_id=str(model_dir), dtype="float32", max_total_tokens=256, max_batch_total_tokens=8192,
                    max_batch_prefill_tokens=48, num_threads=1)
    return LLMEngine(EngineConfig(**{**settings, **overrides}))


def record_decoder_batches(engine) -> list[int]:
    """Requests per decoder forward (native: the CrossBatch's rows; transformers: the chunks)."""
    sizes, decode = [], engine.runner.model.decode

    def recording(chunks, *args, **kwargs):
        sizes.append(args[1].num_rows if engine.model_path_kind == "native" else len(chunks))
        return decode(chunks, *args, **kwargs)

    engine.runner.model.decode = recording
    return sizes


def record_encoder_calls(engine) -> list[int]:
    lengths, encode = [], engine.runner.model.encode

    def recording(prompts):
        lengths.extend(len(p) for p in prompts)
        return encode(prompts)

    engine.runner.model.encode = recording
    return lengths


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


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, save_family(path, request.param, smollm2_dir)


def test_prompts_sent_at_once_share_decoder_forwards_and_equal_transformers(family):
    """The prefill budget (48) starts them in two steps, so two decoder lengths; the paged decoder runs
    all six in one forward. Their blocks and cross-attention K/V are gone once they finish."""
    name, path, hf = family
    prompts = random_prompts([5, 17, 9, 30, 3, 12])
    engine = make_engine(path)
    assert engine.model_path_kind == "native"
    assert engine.runner.decode_backend == ("gather" if name == "t5" else "kernel")
    sizes, encoded = record_decoder_batches(engine), record_encoder_calls(engine)
    assert engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)) == reference(hf, prompts)
    assert sorted(encoded) == sorted(len(p) for p in prompts)  # each prompt encoded exactly once
    assert max(sizes) == 6, sizes
    assert not engine.runner.cross and engine.kv_cache.num_used_blocks == 0


def test_requests_joining_mid_decode_with_chunked_prefill_equal_transformers(family):
    _, path, hf = family
    prompts = random_prompts([5, 70, 12, 1, 50, 7, 22, 3])  # 70 and 50 take two or more prefill chunks
    engine = make_engine(path)
    encoded = record_encoder_calls(engine)
    assert run_arriving(engine, prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)) == reference(
        hf, prompts)
    assert sorted(encoded) == sorted(len(p) for p in prompts)  # a chunked prompt is encoded once, when complete


def test_preempted_requests_recompute_and_stay_exact(family):
    _, path, hf = family
    prompts = random_prompts([20, 18, 25, 16, 22, 19], seed=2)
    # a prefill budget of 16: a recomputed request's decoder tokens come back in chunks over its cached ones
    engine = make_engine(path, max_batch_total_tokens=96, block_size=16, max_batch_prefill_tokens=16)
    encoded, prefixed, execute = record_encoder_calls(engine), [], engine.runner.execute

    def recording(out, rows):
        prefixed.extend(s.num_new_tokens for s in out.scheduled
                        if s.request.num_computed_tokens > s.request.num_prompt_tokens and s.num_new_tokens > 1)
        return execute(out, rows)

    engine.runner.execute = recording
    got = engine.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0 and prefixed
    assert got == reference(hf, prompts, max_new=24)
    # a preempted request's cross-attention K/V went with its blocks: its encoder ran again
    assert len(encoded) > len(prompts)
    assert not engine.runner.cross and engine.kv_cache.num_used_blocks == 0


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
    assert not engine.runner.cross and engine.kv_cache.num_used_blocks == 0


def test_t5_v1_1_gated_gelu_with_its_own_head_equals_transformers(tmp_path, smollm2_dir):
    hf = save_family(tmp_path, "t5", smollm2_dir, **T5_GATED)
    prompts = random_prompts([6, 21, 3, 14], seed=5)
    engine = make_engine(tmp_path)
    assert engine.model_path_kind == "native" and not engine.runner.model.scale_outputs
    assert engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)) == reference(hf, prompts)


def test_a_variant_the_port_lacks_falls_back_to_the_transformers_runner(tmp_path, smollm2_dir):
    hf = save_family(tmp_path, "bart", smollm2_dir, activation_function="quick_gelu")
    engine = make_engine(tmp_path)
    assert engine.model_path_kind == "transformers-seq2seq"
    prompts = random_prompts([9], seed=3)
    assert engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True)) == reference(
        hf, prompts, max_new=4)


def test_transformers_runner_serves_the_fallback_exactly(family):
    """--use-transformers-fallback: T5 left-pads both decoder lengths into one forward (relative
    positions); BART's learned positions keep each length in its own forward."""
    name, path, hf = family
    prompts = random_prompts([5, 17, 9, 30, 3, 12])
    engine = make_engine(path, use_transformers_fallback=True)
    assert engine.model_path_kind == "transformers-seq2seq"
    sizes, encoded = record_decoder_batches(engine), record_encoder_calls(engine)
    assert engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)) == reference(hf, prompts)
    assert sorted(encoded) == sorted(len(p) for p in prompts)
    assert max(sizes) == (6 if name == "t5" else 3), sizes
    assert not engine.runner.homes and engine.kv_cache.num_used_blocks == 0


def test_transformers_runner_preempts_and_runs_one_at_a_time_exactly(family, monkeypatch):
    _, path, hf = family
    monkeypatch.setenv(BATCHING_ENV, "0")
    prompts = random_prompts([14, 12, 16, 13], seed=2)  # four prompts of one block each grow to two: preempted
    engine = make_engine(path, use_transformers_fallback=True, max_total_tokens=64, max_batch_total_tokens=64,
                         block_size=16, max_batch_prefill_tokens=64)
    sizes = record_decoder_batches(engine)
    assert engine.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True)) == reference(
        hf, prompts, max_new=16)
    assert engine.scheduler.num_preemptions > 0 and set(sizes) == {1}


def test_max_new_tokens_counts_generated_tokens_only(family):
    """The prompt is the encoder's: a request may ask for max_total_tokens - prompt tokens, no fewer."""
    _, path, hf = family
    engine = make_engine(path, max_total_tokens=64, max_input_tokens=40)
    prompt = random_prompts([40], seed=7)[0]
    assert engine.validate(prompt, SamplingParams(max_new_tokens=None)) == 24
    with pytest.raises(ValueError, match="must be <= 64"):
        engine.validate(prompt, SamplingParams(max_new_tokens=25))
    assert engine.generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True)) == reference(
        hf, [prompt], max_new=24)


def test_an_eos_from_generation_config_stops_generated_tokens(family, tmp_path):
    """eos is a generated token (the decoder start token never is): the request stops on it, reason eos."""
    _, path, hf = family
    prompts = random_prompts([7, 13, 4], seed=8)
    first = reference(hf, prompts[:1])[0]
    eos = first[3]  # a token greedy decoding produces: it becomes the model's eos
    shutil.copytree(path, tmp_path / "model")
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, eos]}))
    engine = make_engine(tmp_path / "model")
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=MAX_NEW)) for p in prompts]
    tokens, reasons = {i: [] for i in ids}, {}
    while engine.has_unfinished:
        for o in engine.step()[0]:
            tokens[o.request_id].extend(t.id for t in o.new_tokens)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    expected = []
    for p in prompts:
        with torch.no_grad():
            expected.append(hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False,
                                        eos_token_id=[EOS, eos], pad_token_id=0)[0, 1:].tolist())
    expected = [e[:min(e.index(t) + 1 for t in (EOS, eos) if t in e)] if {EOS, eos} & set(e) else e
                for e in expected]
    assert [tokens[i] for i in ids] == expected
    assert tokens[ids[0]][-1] == eos and reasons[ids[0]] == "eos_token"
    assert [reasons[i] for i in ids] == ["eos_token" if e[-1] in (EOS, eos) else "length" for e in expected]


UNSUPPORTED = [  # engine features an encoder-decoder lacks, and the one line that says so
    (["--speculate", "2"], r"--speculate needs a decoder-only native model"),
    (["--num-shard", "2"], r"--num-shard > 1 needs a decoder-only native model"),
    (["--quantize", "eetq"], r"--quantize eetq` needs a decoder-only native model; encoder-decoder"),
]


def test_engine_features_an_encoder_decoder_lacks_are_one_line_start_up_errors(family):
    _, path, _ = family
    base = [str(Path(sys.executable).parent / "genserve"), "serve", "--model-id", str(path), "--port", "1",
            "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "128"]
    # the three commands run side by side: each one's cost is the interpreter's start-up
    procs = [subprocess.Popen([*base, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for flags, _ in UNSUPPORTED]
    for proc, (flags, pattern) in zip(procs, UNSUPPORTED, strict=True):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1 and "Traceback" not in stderr, (flags, stderr[-3000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("genserve serve: error: ") and re.search(pattern, last), last
        assert "Loading weights" not in stderr and "Uvicorn running" not in stdout + stderr


def test_repetition_penalty_reads_decoder_tokens_as_transformers_does(family):
    """Prompts hold the tokens greedy decoding picks, so penalizing the prompt would change the outputs."""
    _, path, hf = family
    prompts = [p + reference(hf, [p])[0][:6] for p in random_prompts([9, 14, 5], seed=9)]
    engine = make_engine(path)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.5))
    expected = []
    for p in prompts:
        with torch.no_grad():
            expected.append(hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                        do_sample=False, repetition_penalty=1.5)[0, 1:].tolist())
    assert got == expected
    assert got != engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))


# ---- over HTTP --------------------------------------------------------------------------------

HTTP_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
                "In a galaxy far away", "SELECT * FROM"]


@pytest.fixture(scope="module")
def served(family, tmp_path_factory):
    name, path, hf = family
    server = start_server(tmp_path_factory.mktemp(f"serve-{name}"), "--model-id", str(path),
                          "--max-batch-size", "16")
    yield server, hf, transformers.AutoTokenizer.from_pretrained(path)
    server.stop()


def test_info_names_the_native_path(served):
    server, _, _ = served
    assert httpx.get(server.base_url + "/info", timeout=10).json()["model_path_kind"] == "native"
    assert "model path: native" in server.log()


def test_generate_routes_sent_at_once_equal_transformers(served):
    server, hf, tokenizer = served
    prompts = [tokenizer.encode(p) for p in HTTP_PROMPTS]
    expected = reference(hf, prompts, stop_at_eos=True)

    def generate(prompt: str) -> dict:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
        response = httpx.post(server.base_url + "/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    def stream(prompt: str) -> list[dict]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
        events = []
        with httpx.stream("POST", server.base_url + "/generate_stream", json=body, timeout=300) as response:
            assert response.status_code == 200
            events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
        return events

    def completion(prompt: str) -> dict:
        body = {"model": "m", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "logprobs": 1}
        response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(3 * len(HTTP_PROMPTS)) as pool:
        generated = [pool.submit(generate, p) for p in HTTP_PROMPTS]
        streamed = [pool.submit(stream, p) for p in HTTP_PROMPTS]
        completed = [pool.submit(completion, p) for p in HTTP_PROMPTS]
        generated, streamed, completed = ([f.result() for f in fs] for fs in (generated, streamed, completed))
    for ids, body, events, comp in zip(expected, generated, streamed, completed, strict=True):
        details = body["details"]
        assert [t["id"] for t in details["tokens"]] == ids
        assert details["generated_tokens"] == len(ids)
        assert details["finish_reason"] == ("eos_token" if ids[-1] == EOS else "length")
        assert body["generated_text"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert [e["token"]["id"] for e in events] == ids
        assert events[-1]["generated_text"] == body["generated_text"]
        assert events[-1]["details"]["finish_reason"] == details["finish_reason"]
        assert comp["choices"][0]["text"] == body["generated_text"]
        assert comp["choices"][0]["finish_reason"] == ("stop" if ids[-1] == EOS else "length")
        assert comp["usage"]["completion_tokens"] == len(ids)
    assert [c["usage"]["prompt_tokens"] for c in completed] == [len(p) for p in prompts]


def test_chat_without_a_template_answers_422(served):
    server, _, _ = served
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()
    assert "template" in error["error"].lower() and error["error_type"] == "template_error"
