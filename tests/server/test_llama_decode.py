"""The fused decode step (kernels/llama_decode_cpu.cpp, models/fused_decode.py) on SmolLM2's Q4_1 GGUF: the same
tokens and the same log-probabilities, to the bit, as the op-by-op path, for one sequence (the row kernel) and
for a batch (the panel kernel), with float and int8 activations; where it does not fit, the op-by-op path."""

from __future__ import annotations

import pytest
import torch
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


def fused_and_op_by_op(engine: LLMEngine, prompts: list[list[int]]):
    body = engine.runner.model.body
    fused = body.fused_decode
    assert fused is not None, "the fused decode step should serve this model"
    calls = []
    original = fused.__call__

    def counting(hidden, positions):
        out = original(hidden, positions)
        calls.append(out is not None)
        return out

    body.fused_decode = counting
    try:
        with_fused = run(engine, prompts)
    finally:
        body.fused_decode = None
    op_by_op = run(engine, prompts)
    body.fused_decode = fused
    return with_fused, op_by_op, calls


@pytest.mark.parametrize("activations", [None, "int8"])
def test_fused_decode_is_the_op_by_op_path_to_the_bit(gguf_file, activations):
    engine = make_engine(gguf_file, activation_quantization=activations)
    prompts = tokenize(engine.model_dir)
    # one row (4-row tiles), four rows (panels / int8 rows), twenty (panels: int8 activations stop at 16 rows)
    for batch in (prompts[:1], prompts, prompts * 5):
        with_fused, op_by_op, calls = fused_and_op_by_op(engine, batch)
        assert any(calls), "no decode step went through the fused call"
        assert with_fused == op_by_op  # tokens and float log-probabilities, exactly
        assert all(len(tokens) == NEW_TOKENS for tokens in with_fused)


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
