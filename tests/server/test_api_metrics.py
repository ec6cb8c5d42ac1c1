"""/metrics exposition (TGI names, no `_total` on TGI counters), JSON request logs, client disconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import httpx
import pytest
from api_fakes import FakeEngine, load_tokenizer
from prometheus_client.parser import text_string_to_metric_families

from genserve.server.api.app import create_app
from genserve.server.logging_setup import JsonFormatter

TGI_NAMES = {
    "tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens", "tgi_request_count",
    "tgi_request_success", "tgi_request_failure", "tgi_request_duration", "tgi_request_validation_duration",
    "tgi_request_queue_duration", "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration",
    "tgi_request_input_length", "tgi_request_generated_tokens", "tgi_request_max_new_tokens",
    "tgi_batch_forward_duration", "tgi_batch_inference_count",
}
GENSERVE_SAMPLES = {
    "genserve_kv_cache_usage_ratio", "genserve_num_requests_waiting", "genserve_num_requests_running",
    "genserve_num_preemptions_total", "genserve_prefix_cache_queries_total", "genserve_prefix_cache_hits_total",
    "genserve_prompt_tokens_total", "genserve_generation_tokens_total",
    "genserve_time_to_first_token_seconds_bucket", "genserve_inter_token_latency_seconds_bucket",
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Exposed sample names exactly as written (prometheus_client's parser renames counters to *_total)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


async def test_metrics_names_and_values(tokenizer):
    engine = FakeEngine(tokenizer)
    app = create_app(engine)
    async with app.router.lifespan_context(app):
        await app.state.service.started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for _ in range(2):
                assert (await client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})).status_code == 200
            await client.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
            await client.post("/generate", json={"inputs": "Hi", "parameters": {"temperature": -1}})
            r = await client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    lines = text.splitlines()
    # TGI's exporter writes counters without `_total`
    assert "tgi_request_count 4" in lines
    assert "tgi_request_success 3" in lines
    assert 'tgi_request_failure{err="validation"} 1' in lines
    assert "# TYPE tgi_request_count counter" in lines
    assert not any(line.startswith("tgi_") and "_total" in line.split(" ")[0] for line in lines)
    assert not any("_created" in line for line in lines)
    assert list(text_string_to_metric_families(text))  # well-formed for Prometheus
    s = samples(text)
    names = {name for name, _ in s}
    for name in TGI_NAMES:
        assert name in names or f"{name}_bucket" in names, name
    for name in GENSERVE_SAMPLES:
        assert name in names, name
    assert s[("tgi_request_duration_count", ())] == 3
    assert s[("tgi_request_generated_tokens_sum", ())] == 9
    assert s[("tgi_batch_inference_count", (("method", "prefill"),))] == 3
    assert s[("tgi_batch_forward_duration_count", (("method", "decode"),))] >= 6
    assert s[("genserve_time_to_first_token_seconds_count", ())] == 3
    assert s[("genserve_inter_token_latency_seconds_count", ())] == 6
    assert s[("genserve_kv_cache_usage_ratio", ())] == 0


async def _raw_stream_then_disconnect(app, body: dict, after_events: int) -> list[bytes]:
    """Drive the ASGI app directly: read `after_events` SSE frames, then the client goes away."""
    payload = json.dumps(body).encode()
    got: list[bytes] = []
    enough = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            got.append(message["body"])
            if len(got) >= after_events:
                enough.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/generate_stream", "raw_path": b"/generate_stream",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                               (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return got


async def test_disconnect_aborts_and_frees_blocks(tokenizer):
    engine = FakeEngine(tokenizer, step_delay=0.01)
    app = create_app(engine)
    async with app.router.lifespan_context(app):
        await app.state.service.started
        got = await _raw_stream_then_disconnect(app, {"inputs": "Hi", "parameters": {"max_new_tokens": 200}}, 3)
        assert 3 <= len(got) < 200
        assert engine.blocks_used == 0 and engine.num_running == 0
        assert len(engine.aborted) == 1
        assert app.state.service.num_in_flight == 0
        assert app.state.metrics.counter_value("tgi_request_failure", "cancelled") == 1


async def test_json_request_log_line(tokenizer, caplog):
    engine = FakeEngine(tokenizer)
    app = create_app(engine)
    with caplog.at_level(logging.INFO, logger="genserve.request"):
        async with app.router.lifespan_context(app):
            await app.state.service.started
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                r = await client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}},
                                      headers={"x-request-id": "req-123"})
    assert r.headers["x-request-id"] == "req-123"
    records = [rec for rec in caplog.records if rec.name == "genserve.request"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "req-123" and line["level"] == "INFO"
    fields = line["fields"]
    assert fields["route"] == "/generate" and fields["status"] == 200 and fields["generated_tokens"] == 3
    for key in ("total_time_s", "validation_time_s", "queue_time_s", "inference_time_s", "time_per_token_s"):
        assert key in fields
