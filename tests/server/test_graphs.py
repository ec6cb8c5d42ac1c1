"""Decode steps padded to batch-size buckets on static buffers (genserve.server.graphs), run eagerly on
CPU: the same padding, buffers and metadata a CUDA capture records, with the same tokens as the plain
eager step, padding that never writes a request's KV, and every tensor-parallel rank in step."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from model_helpers import save_tiny_llama
from test_engine import make_engine
from transformers import AutoTokenizer

from genserve.server import distributed, kernels
from genserve.server.config import EngineConfig
from genserve.server.graphs import DecodeGraphs, graph_batch_sizes
from genserve.server.sampling_params import SamplingParams
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "Hello, my name is", "Q: What is 2+2?\nA:"]


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-graphs"), smollm2_dir, num_kv_heads=1)


def test_batch_sizes_from_the_flag(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("GENSERVE_EAGER_GRAPHS", raising=False)
    assert graph_batch_sizes(None, cuda, 256) == [1, 2, 4, 8, 16, 32]  # TGI's default
    assert graph_batch_sizes(None, cuda, 8) == [1, 2, 4, 8]
    assert graph_batch_sizes("0", cuda, 256) == []
    assert graph_batch_sizes("8,1,2,2", cuda, 256) == [1, 2, 8]
    assert graph_batch_sizes(None, cpu, 256) == [] and graph_batch_sizes("1,2", cpu, 256) == []  # ignored
    monkeypatch.setenv("GENSERVE_EAGER_GRAPHS", "1")
    assert graph_batch_sizes("1,2", cpu, 256) == [1, 2] and graph_batch_sizes(None, cpu, 256) == []
    for bad in ("1,x", "-2", "0,4"):
        with pytest.raises(ValueError, match="`--cuda-graphs` must be comma-separated batch sizes"):
            EngineConfig(cuda_graphs=bad)


def with_graphs(engine, buckets):
    runner = engine.runner
    runner.enable_decode_graphs(buckets, capture=False)
    assert isinstance(runner.graphs, DecodeGraphs)
    used = []
    run = runner.graphs.run

    def recording(bucket, input_ids, *args):
        used.append((input_ids.shape[0], bucket))
        return run(bucket, input_ids, *args)

    runner.graphs.run = recording
    return used


def staggered(engine, prompts, params):
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:3], params[:3], strict=True)]
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished or step < 3:
        if step == 3:
            ids += [engine.add_request(p, sp) for p, sp in zip(prompts[3:], params[3:], strict=True)]
        for o in engine.step()[0]:
            tokens.setdefault(o.request_id, []).extend(t.id for t in o.new_tokens)
        step += 1
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_padded_decode_steps_give_the_eager_tokens(model, tiny_dir, smollm2_dir, prompts):
    # the tiny model decodes through gather + SDPA, SmolLM2 through the native kernel where it builds
    model_dir = tiny_dir if model == "tiny" else smollm2_dir
    greedy = SamplingParams(max_new_tokens=10, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=10, ignore_eos=True, do_sample=True, temperature=0.8, top_k=30, seed=11)
    params = [greedy, sampled, greedy, greedy, sampled, greedy]
    expected = staggered(make_engine(model_dir), prompts, params)
    engine = make_engine(model_dir)
    used = with_graphs(engine, [1, 2, 4])
    assert staggered(engine, prompts, params) == expected
    assert engine.kv_cache.num_used_blocks == 0
    assert {bucket for _, bucket in used} == {4}  # 3 rows padded to 4; 6 rows (> 4) and prefill steps eager
    assert any(rows < bucket for rows, bucket in used)
    single = staggered(engine, prompts[:1], [greedy])  # one request alone: bucket 1
    assert single == expected[:1] and used[-1] == (1, 1)
    if model == "smollm2" and kernels.load_cpu_kernels():
        assert engine.runner.graphs.backend == "kernel"


def test_padding_rows_write_only_the_scratch_block(tiny_dir, prompts):
    engine = make_engine(tiny_dir)
    runner = engine.runner
    used = with_graphs(engine, [4])
    for p in prompts[:3]:
        engine.add_request(p, SamplingParams(max_new_tokens=4))
    engine.step()  # the three prefills
    running = list(engine.scheduler.running)
    out = SchedulerOutput([ScheduledRequest(r, 1) for r in running])
    layer = runner.attention_layers[0]
    before = layer.k_cache.clone()
    padded_logits, _ = runner.forward(runner.prepare(out))
    assert used == [(3, 4)]
    changed = (layer.k_cache != before).any(-1).any(-1).nonzero().flatten().tolist()
    bs = runner.block_size
    real = {r.block_ids[r.num_computed_tokens // bs] * bs + r.num_computed_tokens % bs for r in running}
    scratch = range(runner.scratch_block * bs, (runner.scratch_block + 1) * bs)
    assert set(changed) - real <= set(scratch) and real <= set(changed)
    assert runner.scratch_block == runner.num_blocks == engine.kv_cache.num_blocks  # never handed out
    runner.graphs = None
    eager_logits, _ = runner.forward(runner.prepare(out))
    torch.testing.assert_close(padded_logits, eager_logits, atol=1e-4, rtol=1e-4)


def test_two_shards_pad_in_step(tiny_dir, prompts, monkeypatch):
    # every rank takes the padded path for the same steps: the all-reduces pair up, tokens unchanged
    monkeypatch.setenv("GENSERVE_EAGER_GRAPHS", "1")
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True)] * 4
    expected = staggered(make_engine(tiny_dir), prompts[:4], params)
    engine = make_engine(tiny_dir, num_shard=2, cuda_graphs="1,2,4")
    try:
        assert distributed.get_tp_size() == 2 and engine.runner.graphs is not None
        assert staggered(engine, prompts[:4], params) == expected
    finally:
        engine.shutdown()
    assert not multiprocessing.active_children()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,block_size", [("float32", 16), ("bfloat16", 256)])
def test_captured_graphs_replay_what_the_padded_eager_step_gives(dtype, block_size, tiny_dir, prompts):
    # float32 decodes through gather (graph width: max_total_tokens), bfloat16 with 256-token blocks
    # through FlashAttention reading the pool in place
    params = [SamplingParams(max_new_tokens=10, ignore_eos=True)] * 6
    settings = dict(device="cuda", dtype=dtype, block_size=block_size)
    eager = make_engine(tiny_dir, cuda_graphs="0", **settings)
    assert eager.runner.graphs is None
    plain = staggered(eager, prompts, params)
    padded = make_engine(tiny_dir, cuda_graphs="0", **settings)
    with_graphs(padded, [1, 2, 4])
    captured = make_engine(tiny_dir, cuda_graphs="1,2,4", **settings)
    assert sorted(captured.runner.graphs.graphs) == [1, 2, 4]
    expected = staggered(padded, prompts, params)
    assert staggered(captured, prompts, params) == expected  # the same kernels, replayed
    if dtype == "float32":
        assert expected == plain
