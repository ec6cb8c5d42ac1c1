"""Requests through the app (fake engine) reach a real OTLP/HTTP receiver as one trace each: the route's
server span under the caller's traceparent, with validate/queue/prefill/decode children."""

from __future__ import annotations

import httpx
import pytest
from api_fakes import FakeEngine, load_tokenizer
from otlp_receiver import OtlpReceiver

from genserve.server import tracing
from genserve.server.api.app import create_app

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@pytest.fixture
def receiver():
    receiver = OtlpReceiver()
    tracing.configure_tracing(receiver.url, "genserve-api-test")
    yield receiver
    tracing.shutdown_tracing()
    receiver.close()


async def test_each_request_is_one_trace_under_the_callers_traceparent(receiver):
    app = create_app(FakeEngine(load_tokenizer(), step_delay=0.002))
    async with app.router.lifespan_context(app):
        await app.state.service.started
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            r = await client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}},
                                  headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
            assert r.status_code == 200
            r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                               "max_tokens": 0})
            assert r.status_code == 422
    assert tracing.flush_traces()
    spans = receiver.wait_for(lambda s: len(s) >= 7)
    mine = {s["name"]: s for s in spans if s["trace_id"] == TRACE_ID}
    assert set(mine) == {"/generate", "validate", "queue", "prefill", "decode"}
    root = mine["/generate"]
    assert root["parent_id"] == PARENT_ID and root["kind"] == 2
    assert all(mine[n]["parent_id"] == root["span_id"] for n in ("validate", "queue", "prefill", "decode"))
    assert root["attributes"]["http.status_code"] == 200 and "total_time" in root["attributes"]
    others = [s for s in spans if s["trace_id"] != TRACE_ID]
    assert {s["name"] for s in others} == {"/v1/chat/completions", "validate"}
    failed = next(s for s in others if s["name"] == "/v1/chat/completions")
    assert failed["attributes"]["http.status_code"] == 422 and "max_tokens" in failed["attributes"]["error"]
