"""The fused decode step (kernels/llama_decode_cpu.cpp, models/fused_decode.py) on SmolLM2's Q4_1 GGUF: the same
tokens and the same log-probabilities, to the bit, as the op-by-op path, for one sequence (the row kernel) and
for a batch (the panel kernel), with float and int8 activations, whether the LM head and the greedy pick run in the
native call or in Python, one step per call or several back to back; where it does not fit, the op-by-op path."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from http_server import start_server
from quant_reference import tokenize

from genserve.server import kernels
from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.models import fused_decode
from genserve.server.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not kernels.load_cpu_kernels(), reason="native CPU kernels unavailable")

NEW_TOKENS = 12


def make_engine(gguf_file, **settings) -> LLMEngine:
    # no prefix caching: a rerun would read K/V its first run wrote, from decode steps instead of a prefill
    return LLMEngine(EngineConfig(model_id=str(gguf_file), dtype="float32", max_batch_total_tokens=4096,
                                  max_total_tokens=512, enable_prefix_caching=False, **settings))


def run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[tuple[int, float]]]:
    """Each prompt's greedy (token, logprob) pairs, all prompts in one batch."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[tuple[int, float]]] = {i: [] for i in ids}
    while engine.has_unfinished:
        outputs, _ = engine.step()
        for o in outputs:
            tokens[o.request_id].extend((t.id, t.logprob) for t in o.new_tokens)
    return [tokens[i] for i in ids]


def three_paths(engine: LLMEngine, prompts: list[list[int]]):
    """The batch run three ways: greedy steps in one native call each (LM head and pick included: the default
    for greedy rows), the fused layer stack with the LM head and sampler in Python, and op by op. Also how many
    decode steps each fused path served."""
    body, runner = engine.runner.model.body, engine.runner
    fused = body.fused_decode
    assert fused is not None and fused.runs_greedy_steps, "the fused greedy steps should serve this model"
    calls = {"greedy steps": 0, "layers": 0}
    original_steps, original_call = fused.greedy_steps, fused.__call__

    def counting_steps(*args):
        calls["greedy steps"] += 1
        return original_steps(*args)

    def counting_call(hidden, positions):
        out = original_call(hidden, positions)
        calls["layers"] += out is not None
        return out

    fused.greedy_steps = counting_steps
    try:
        greedy_steps = run(engine, prompts)
        runner.runs_greedy_steps = lambda *_: False
        body.fused_decode = counting_call
        layers = run(engine, prompts)
        body.fused_decode = None
        op_by_op = run(engine, prompts)
    finally:
        del fused.greedy_steps, runner.runs_greedy_steps
        body.fused_decode = fused
    return greedy_steps, layers, op_by_op, calls


@pytest.mark.parametrize("activations", [None, "int8"])
def test_fused_decode_is_the_op_by_op_path_to_the_bit(gguf_file, activations):
    engine = make_engine(gguf_file, activation_quantization=activations)
    prompts = tokenize(engine.model_dir)
    # one row (4-row tiles), four rows (panels / int8 rows), twenty (panels, or int8 rows within their timed limit)
    for batch in (prompts[:1], prompts, prompts * 5):
        greedy_steps, layers, op_by_op, calls = three_paths(engine, batch)
        assert calls["greedy steps"] >= NEW_TOKENS - 1 and calls["layers"] >= NEW_TOKENS - 1, calls
        assert greedy_steps == layers == op_by_op  # tokens and float log-probabilities, exactly
        assert all(len(tokens) == NEW_TOKENS for tokens in greedy_steps)


@pytest.mark.parametrize("activations", [None, "int8"])
def test_steps_back_to_back_are_the_steps_one_by_one(gguf_file, activations, monkeypatch):
    """--num-scheduler-steps 5: each native call decodes 5 tokens per row, feeding its picks to the next step;
    the tokens and log-probabilities are those of one step per call, also where a request's last burst is short
    (NEW_TOKENS = 12 is not a multiple of 5) and where rows leave the batch at different steps."""
    monkeypatch.setenv("GENSERVE_INT8_ACTIVATION_ROWS", "16")  # two engines round the same rows: fixed, not timed
    one = make_engine(gguf_file, activation_quantization=activations)
    five = make_engine(gguf_file, activation_quantization=activations, num_scheduler_steps=5)
    prompts = tokenize(one.model_dir)
    calls = []
    fused = five.runner.model.body.fused_decode
    original = fused.greedy_steps

    def recording(token_ids, positions, steps, *rest):
        calls.append(steps)
        return original(token_ids, positions, steps, *rest)

    fused.greedy_steps = recording
    for batch in (prompts[:1], prompts):
        calls.clear()
        assert run(five, batch) == run(one, batch)
        # the first token comes from the prefill; 11 more in bursts of 5, 5 and the 1 left
        assert calls == [5, 5, 1], calls
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (3, 9, 12, 7)]
    for engine in (one, five):
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        got: dict[str, list] = {i: [] for i in ids}
        while engine.has_unfinished:
            for o in engine.step()[0]:
                got[o.request_id] += [(t.id, t.logprob) for t in o.new_tokens]
        if engine is one:
            expected = [got[i] for i in ids]
    assert [got[i] for i in ids] == expected
    assert [len(tokens) for tokens in expected] == [3, 9, 12, 7]


def test_float_weights_and_the_switch_keep_the_op_by_op_path(gguf_file, smollm2_dir, monkeypatch):
    float_engine = LLMEngine(EngineConfig(model_id=str(smollm2_dir), dtype="float32", max_batch_total_tokens=2048,
                                          max_total_tokens=256))
    assert float_engine.runner.model.body.fused_decode is None
    reason = fused_decode.build(float_engine.runner.model, 1, False)[1]
    assert "grouped" in reason
    monkeypatch.setenv("GENSERVE_FUSED_DECODE", "0")
    off = make_engine(gguf_file)
    assert off.runner.model.body.fused_decode is None
    assert fused_decode.build(off.runner.model, 1, False) == (None, "off (GENSERVE_FUSED_DECODE=0)")
    assert fused_decode.build(off.runner.model, 2, False)[0] is None


def test_bad_operands_are_refused_before_any_thread_starts(gguf_file):
    engine = make_engine(gguf_file)
    fused = engine.runner.model.body.fused_decode
    hidden = torch.zeros(1, fused.norm_weights[0].shape[0])
    args = dict(hidden=hidden, positions=torch.tensor([3]), norms=fused.norm_weights,
                qweights=fused.qweights, scales=fused.scales, mins=fused.mins, group_sizes=fused.group_sizes,
                k_caches=fused.k_caches, v_caches=fused.v_caches, cos_sin=fused.cos_sin,
                slot_mapping=torch.tensor([3]), block_tables=torch.tensor([[0]]), context_lens=torch.tensor([4]),
                block_size=engine.config.block_size, num_heads=fused.num_heads, num_kv_heads=fused.num_kv_heads,
                attn_scale=fused.scale, eps=fused.eps, int8_activations=False)
    assert kernels.llama_decode(**args).shape == hidden.shape
    pool_blocks = fused.k_caches[0].shape[0] // engine.config.block_size
    for change, message in ((dict(block_tables=torch.tensor([[pool_blocks]])), "outside the pool"),
                            (dict(slot_mapping=torch.tensor([-1])), "outside the pool"),
                            (dict(positions=torch.tensor([10**9])), "outside the cache"),
                            (dict(group_sizes=[48] * len(fused.group_sizes)), "group size"),
                            (dict(qweights=fused.qweights[1:] + fused.qweights[:1]), "qkv_proj")):
        with pytest.raises(RuntimeError, match=message):
            kernels.llama_decode(**{**args, **change})


def test_a_stop_inside_a_burst_drops_the_tokens_after_it(gguf_file):
    """A stop sequence or EOS met mid-burst ends the request where one step per call would have, text and all."""
    one = make_engine(gguf_file)
    eight = make_engine(gguf_file, num_scheduler_steps=8)
    prompt = tokenize(one.model_dir)[0]

    def finish(engine, params):
        engine.add_request(prompt, params)
        tokens, last = [], None
        while engine.has_unfinished:
            for o in engine.step()[0]:
                tokens += [t.id for t in o.new_tokens]
                last = o
        return tokens, last.finish_reason, last.generated_text

    free, _, text = finish(one, SamplingParams(max_new_tokens=20, ignore_eos=True))
    stop = one.tokenizer.decode(free[5:7])
    assert stop.strip() and stop in text
    for params in (SamplingParams(max_new_tokens=20, stop=[stop]),
                   SamplingParams(max_new_tokens=20, stop_token_ids=[free[6]])):
        expected = finish(one, params)
        assert finish(eight, params) == expected
        assert expected[1] in ("stop_sequence", "eos_token") and len(expected[0]) < 20


def test_steps_back_to_back_need_the_fused_greedy_call(smollm2_dir, caplog):
    with pytest.raises(ValueError, match="num-scheduler-steps"):
        EngineConfig(model_id=str(smollm2_dir), num_scheduler_steps=0)
    with pytest.raises(ValueError, match="choose one"):
        EngineConfig(model_id=str(smollm2_dir), num_scheduler_steps=4, speculate=2)
    engine = LLMEngine(EngineConfig(model_id=str(smollm2_dir), dtype="float32", max_batch_total_tokens=2048,
                                    max_total_tokens=256, num_scheduler_steps=4))
    assert engine.num_scheduler_steps == 1 and "one decode step at a time" in caplog.text


def test_bursts_stream_over_http_as_single_steps_would(gguf_file, tmp_path):
    """A real server with --num-scheduler-steps 4: TGI's stream still sends one event per token, OpenAI's stream
    and non-streamed requests the same text and token counts as one step per call (in process here)."""
    one = make_engine(gguf_file)
    prompt = "The three primary colors are"
    ids = one.tokenizer(prompt)["input_ids"]
    one.add_request(ids, SamplingParams(max_new_tokens=10))
    expected = []
    while one.has_unfinished:
        expected += [t.id for o in one.step()[0] for t in o.new_tokens]
    expected_text = one.tokenizer.decode([t for t in expected if t not in one.eos_token_ids])
    server = start_server(tmp_path, "--model-id", str(gguf_file), "--num-scheduler-steps", "4")
    try:
        decode_steps = 'tgi_batch_forward_duration_count{method="decode"}'
        before = server.metrics().get(decode_steps, 0)
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 10, "details": True, "stop": []}}
            with client.stream("POST", "/generate_stream", json=body) as response:
                events = [line for line in response.iter_lines() if line.startswith("data:")]
            assert [json.loads(e[5:])["token"]["id"] for e in events] == expected
            request = {"model": "tgi", "prompt": ids, "max_tokens": 10, "temperature": 0}
            with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
                chunks = [line for line in response.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
            text = "".join(json.loads(c[5:])["choices"][0]["text"] for c in chunks)
            assert text == expected_text
            done = client.post("/v1/completions", json=request).json()
            assert done["choices"][0]["text"] == expected_text
            assert done["usage"]["completion_tokens"] == len(expected)
        # three requests of len(expected) tokens, the first of each from its prefill: bursts of 4 after
        steps = server.metrics()[decode_steps] - before
        assert steps <= 3 * -(-(len(expected) - 1) // 4), steps
    finally:
        server.stop()
