"""The one-row grouped kernels' weight prefetch distance: results never depend on it, and a single stream's first
decode steps pick it (grouped_linear.PrefetchTuner)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import torch_threads
from quant_reference import engine_greedy, tokenize
from test_int4_kernel import random_grouped

from genserve.server import kernels
from genserve.server.layers.grouped_linear import PREFETCH_DISTANCES, PrefetchTuner
from genserve.server.model_files import resolve_model

pytestmark = pytest.mark.skipif(not kernels.load_cpu_kernels(), reason="native CPU kernels unavailable")


@pytest.fixture(autouse=True)
def default_distance():
    yield
    kernels.set_prefetch_distance(1)  # process-wide: leave it as other tests found it


@pytest.mark.parametrize("bits", [4, 8])
def test_the_distance_never_changes_a_result(bits):
    # prefetches never fault nor change values: this guards the kernels' task indexing around them, and the range
    torch.manual_seed(bits)
    qweight, scale, mins = random_grouped(1536, 576, 32, bits, torch.float16)
    x = torch.randn(1, 576)
    outputs = []
    with torch_threads(2):
        for distance in PREFETCH_DISTANCES:
            kernels.set_prefetch_distance(distance)
            outputs.append((kernels.int4_linear(x, qweight, scale, mins, 32, None),
                            kernels.int4_linear_int8_activations(x, qweight, scale, mins, 32, None)))
    assert all(torch.equal(a, outputs[0][0]) and torch.equal(b, outputs[0][1]) for a, b in outputs)
    with pytest.raises(RuntimeError, match="1 to 16"):
        kernels.set_prefetch_distance(0)


def test_the_tuner_keeps_the_distance_of_the_lowest_median():
    tuner = PrefetchTuner()
    slow = {1: 12.0, 2: 11.0, 3: 10.0, 4: 11.5}  # ms per token; 3 is fastest, despite one outlier step
    while tuner.active:
        distance = tuner.next_distance()
        spike = 20.0 if distance == 3 and len(tuner.seconds[3]) == 0 else 0.0
        tuner.record(distance, (slow[distance] + spike) / 1e3)
    assert tuner.chosen == 3
    assert all(len(times) == PrefetchTuner.SAMPLES for times in tuner.seconds.values())


@pytest.fixture(scope="module")
def quantized_dir(gguf_file):
    return resolve_model(str(gguf_file))


def test_a_single_streams_decode_steps_choose_it_and_keep_its_tokens(quantized_dir, smollm2_dir, monkeypatch):
    prompt = tokenize(smollm2_dir)[:1]
    steps = PrefetchTuner.SAMPLES * len(PREFETCH_DISTANCES) + 12
    with torch.no_grad():
        engine, tuned = engine_greedy(quantized_dir, prompt, new_tokens=steps)
        tuner = engine.runner.prefetch_tuner
        assert tuner is not None and tuner.chosen in PREFETCH_DISTANCES
        monkeypatch.setenv("GENSERVE_PREFETCH_DISTANCE", "1")
        engine, fixed = engine_greedy(quantized_dir, prompt, new_tokens=steps)
    assert engine.runner.prefetch_tuner is None
    assert tuned == fixed
