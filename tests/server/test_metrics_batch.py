"""TGI's per-batch metrics from the real engine's steps: forward / filter / decode / inference durations,
next batch size, inference success and concatenation counts (names and buckets as TGI's router)."""

from __future__ import annotations

from test_engine import make_engine

from genserve.server.metrics import BATCH_SIZE_BUCKETS, DURATION_BUCKETS, Metrics
from genserve.server.sampling_params import SamplingParams


def _value(metrics: Metrics, name: str, labels: dict | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_batch_metrics_follow_the_engine_steps(smollm2_dir):
    engine = make_engine(smollm2_dir)
    metrics = Metrics(max_input_tokens=400, max_total_tokens=512)
    params = SamplingParams(max_new_tokens=6)
    steps = []

    def step():
        outputs, stats = engine.step()
        steps.append(stats)
        metrics.observe_step(stats)
        return outputs

    engine.add_request(engine.tokenizer.encode("Hello, my name is"), params)
    for _ in range(3):  # the first request prefills, then decodes alone
        step()
    engine.add_request(engine.tokenizer.encode("The capital of France is"), params)  # joins the running batch
    while engine.has_unfinished:
        step()

    methods = [s.method for s in steps]
    for method in ("prefill", "decode"):
        count = methods.count(method)
        assert metrics.counter_value("tgi_batch_inference_count", method) == count
        assert metrics.counter_value("tgi_batch_inference_success", method) == count
        for name in ("tgi_batch_forward_duration", "tgi_batch_filter_duration", "tgi_batch_decode_duration",
                     "tgi_batch_inference_duration"):
            assert _value(metrics, f"{name}_count", {"method": method}) == count, name
    # a step's inference time is its forward, filter and decode parts together
    total = sum(s.duration_s + s.filter_s + s.decode_s for s in steps)
    assert abs(sum(_value(metrics, "tgi_batch_inference_duration_sum", {"method": m}) for m in ("prefill", "decode"))
               - total) < 1e-9
    assert all(s.filter_s >= 0 and s.decode_s > 0 for s in steps)
    # exactly one step started a request beside a running decode
    assert metrics.counter_value("tgi_batch_concat", "backpressure") == 1
    assert sum(s.joined_running_batch for s in steps) == 1
    # next batch size: what stayed running after each step, ending empty
    assert [s.next_batch_size for s in steps][-1] == 0
    assert max(s.next_batch_size for s in steps) == 2
    assert _value(metrics, "tgi_batch_next_size_count") == len(steps)
    assert _value(metrics, "tgi_batch_next_size_bucket", {"le": "1.0"}) == sum(s.next_batch_size <= 1 for s in steps)


def test_buckets_are_tgis():
    # geometric from 0.15 ms by 1.5, 35 of them; batch sizes 1..1024; lengths in 100 linear steps
    assert len(DURATION_BUCKETS) == 35 and abs(DURATION_BUCKETS[0] - 0.00015) < 1e-12
    assert all(abs(b / a - 1.5) < 1e-9 for a, b in zip(DURATION_BUCKETS, DURATION_BUCKETS[1:], strict=False))
    assert BATCH_SIZE_BUCKETS[0] == 1 and BATCH_SIZE_BUCKETS[-1] == 1024 and len(BATCH_SIZE_BUCKETS) == 1024
    metrics = Metrics(max_input_tokens=1000, max_total_tokens=2000)
    metrics.request_input_length.observe(10)
    assert _value(metrics, "tgi_request_input_length_bucket", {"le": "10.0"}) == 1
    text = metrics.render().decode()
    assert text.count('tgi_request_input_length_bucket{le=') == 101  # 100 + Inf
    assert text.count('tgi_request_generated_tokens_bucket{le="20.0"}') == 1
