"""KV sizing after a dummy maximum-size step: the steps run at init, and the pool is what remains."""

from __future__ import annotations

import pytest
import torch
from model_helpers import save_tiny_llama

from genserve.server import model_runner, warmup
from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.model_runner import ModelRunner
from genserve.server.warmup import LiveTensorBytes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-warmup"), smollm2_dir, num_kv_heads=2)


def sized_engine(model_dir, **overrides) -> LLMEngine:
    settings = dict(model_id=str(model_dir), dtype="float32", max_total_tokens=256, max_input_tokens=200,
                    max_batch_prefill_tokens=300, max_batch_size=24)
    return LLMEngine(EngineConfig(**{**settings, **overrides}))


@pytest.mark.parametrize("size", ["full", "scaled"])
def test_the_largest_steps_run_at_init_before_the_pool_exists(size, tiny_dir, monkeypatch):
    steps, peaks = [], []
    forward, measure = ModelRunner.forward, warmup.measure_peak_bytes

    def spy(self, inputs):
        steps.append((inputs.input_ids.shape[0], inputs.meta.num_decode_tokens, len(inputs.meta.prefill_starts) - 1,
                      self.attention_layers[0].k_cache.shape[0]))
        return forward(self, inputs)

    def measured(run, device):
        peaks.append(measure(run, device))
        return peaks[-1]

    monkeypatch.setattr(ModelRunner, "forward", spy)
    monkeypatch.setattr(warmup, "measure_peak_bytes", measured)
    if size == "full":  # what CUDA runs: the full size
        monkeypatch.setattr(warmup, "CPU_PROFILE_TOKENS", None)
    else:
        monkeypatch.setattr(warmup, "CPU_PROFILE_TOKENS", 100)
        monkeypatch.setattr(warmup, "CPU_PROFILE_ROWS", 8)
    engine = sized_engine(tiny_dir)
    runner = engine.runner
    bs = runner.block_size
    if size == "full":
        # 300 prefill tokens as the scheduler could send them (sequences of at most max_total_tokens = 256),
        # then the largest decode batch (max_batch_size rows), both over a one-block temporary cache
        assert steps == [(300, 0, 2, bs), (24, 24, 0, bs)]
        assert runner.activation_bytes == max(peaks)
    else:  # on CPU: smaller steps, each peak scaled linearly to the full size
        assert steps == [(100, 0, 1, bs), (8, 8, 0, bs)]
        assert runner.activation_bytes == max(int(peaks[0] * 3), int(peaks[1] * 3))
    assert runner.activation_bytes >= 24 * engine.hf_config.vocab_size * 4  # the decode batch's float32 logits
    assert runner.attention_layers[0].k_cache.shape[0] == (runner.num_blocks + 1) * bs
    # an explicit --max-batch-total-tokens on CPU sizes nothing: no warm-up steps
    steps.clear()
    fixed = sized_engine(tiny_dir, max_batch_total_tokens=2048)
    assert steps == [] and fixed.runner.activation_bytes == 0 and fixed.runner.num_blocks == 2048 // 16


@pytest.mark.parametrize("backend", ["kernel", "gather", "varlen"])
def test_the_pool_is_sized_from_what_the_step_leaves(backend, tiny_dir, monkeypatch):
    peak, free = 256 * 2**10, 16 * 2**20
    monkeypatch.setattr(warmup, "profile_max_step", lambda runner: peak)
    monkeypatch.setattr(model_runner, "available_memory", lambda device: free)
    monkeypatch.setenv("GENSERVE_DECODE_ATTENTION", "gather")
    runner = sized_engine(tiny_dir).runner
    per_layer = 2 * 2 * 16 * 4  # K and V of 2 KV heads of 16 floats, per token and layer
    budget = free // 4 - peak  # a quarter of free RAM on CPU, less the largest step
    padded_copy = 24 * 256 * per_layer  # gather: one layer's contexts, a full batch padded to max_total_tokens
    # built with gather: the padded copy comes off first, then the cap of a full batch at max length
    assert runner.num_blocks == min((budget - padded_copy) // (2 * per_layer), 24 * 256) // 16
    runner.decode_backend = backend  # the rule for each backend
    expected = {"kernel": budget // (2 * per_layer),
                "gather": (budget - padded_copy) // (2 * per_layer),
                "varlen": budget // (3 * per_layer)}  # + one layer's packed copy of the whole pool
    assert runner._tokens_within(budget, per_layer) == expected[backend]


def test_live_tensor_bytes_counts_what_is_alive_at_once():
    weight = torch.ones(1000)
    with LiveTensorBytes() as tracker:
        a = weight * 2  # 4000 B
        b = torch.empty(2000)  # 8000 B
        view = a[:10]
        del a
        c = b + 1  # a is still alive through its view: 20000 B
        del view, b, c
        d = weight.view(10, 100).sum(0)  # views of the weight cost nothing
    assert tracker.peak == 20000 and tracker.current == d.untyped_storage().nbytes()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_measured_peak_covers_a_real_largest_step_on_cuda(tiny_dir):
    engine = sized_engine(tiny_dir, device="cuda", cuda_graphs="0", kv_cache_memory_fraction=0.05)
    runner = engine.runner
    assert runner.activation_bytes > 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for out, rows in warmup.max_size_steps(engine.config, runner.device, 300, 24):
        with torch.inference_mode():
            logits, _ = runner.forward(runner.local_inputs(out))
            runner.sampler(logits.float(), rows)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= runner.activation_bytes * 1.1
