"""OpenTelemetry traces sent to a real OTLP/HTTP receiver: one trace per request, TGI's span fields,
the caller's `traceparent` honoured."""

from __future__ import annotations

import time

import pytest
from otlp_receiver import OtlpReceiver

from genserve.server import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def receiver():
    receiver = OtlpReceiver()
    tracing.configure_tracing(receiver.url, "genserve-test")
    yield receiver
    tracing.shutdown_tracing()
    receiver.close()


def test_request_spans_reach_the_collector_under_the_callers_trace(receiver):
    t0 = time.perf_counter()
    times = tracing.RequestTimes(start=t0, validated=t0 + 0.002, queue_s=0.010, first_token=t0 + 0.050,
                                 end=t0 + 0.250, num_generated_tokens=20, attributes={"seed": 7})
    tracing.trace_request("generate", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}, times)
    tracing.trace_request("chat_completions", {}, tracing.RequestTimes(start=t0, end=t0 + 0.001))
    assert tracing.flush_traces()
    spans = receiver.wait_for(lambda s: len(s) >= 7)
    by_name = {s["name"]: s for s in spans if s["trace_id"] == TRACE_ID}
    assert set(by_name) == {"generate", "validate", "queue", "prefill", "decode"}
    root = by_name["generate"]
    assert root["parent_id"] == PARENT_ID and root["service"] == "genserve-test"
    assert root["kind"] == 2  # SERVER
    for child in ("validate", "queue", "prefill", "decode"):
        assert by_name[child]["parent_id"] == root["span_id"]
    # phases tile the request in order
    order = [by_name[n] for n in ("validate", "queue", "prefill", "decode")]
    assert order[0]["start"] == root["start"] and order[-1]["end"] == root["end"]
    for before, after in zip(order, order[1:], strict=False):
        assert before["end"] == after["start"]
    assert abs((root["end"] - root["start"]) / 1e9 - 0.25) < 1e-6
    assert root["attributes"]["total_time"] == "250ms" and root["attributes"]["queue_time"] == "10ms"
    assert root["attributes"]["time_per_token"] == tracing.duration_text(0.238 / 20)
    assert root["attributes"]["seed"] == 7
    # a request without a traceparent starts its own trace; one that failed validation has only that span
    others = [s for s in spans if s["trace_id"] != TRACE_ID]
    assert {s["name"] for s in others} == {"chat_completions", "validate"}
    assert len({s["trace_id"] for s in others}) == 1


def test_duration_text_as_tgi():
    assert tracing.duration_text(1.5) == "1.5s"
    assert tracing.duration_text(0.01225) == "12.25ms"
    assert tracing.duration_text(0.00083) == "830µs"


def test_tracing_off_is_a_no_op():
    assert not tracing.tracing_enabled()
    tracing.trace_request("generate", {}, tracing.RequestTimes(start=0.0, end=1.0))
