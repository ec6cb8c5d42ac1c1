"""Real HTTP with tight limits: bad input, 413, 401, 429, disconnects, JSON logs, graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from http_server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = {"Authorization": "Bearer s3cret"}
COUNTING = "Count from 1 to 100: 1, 2, 3, 4,"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("serve-limits"), "--max-concurrent-requests", "3",
                       "--payload-limit", "20000", "--max-input-tokens", "100", "--max-total-tokens", "200",
                       "--api-key", "s3cret", "--json-output")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, headers=KEY, timeout=60) as c:
        yield c


def ok(client) -> None:
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text


BAD = [
    (b'{"inputs": "Hi", "parameters": ', 422, "Failed to parse the request body as JSON"),
    (b'{"inputs": ["Hi"]}', 422, "inputs"),
    (b'{"inputs": "Hi", "parameters": {"max_new_tokens": "lots"}}', 422, "max_new_tokens"),
    (b'{"parameters": {"max_new_tokens": 5}}', 422, "inputs: Field required"),
    (b'{"inputs": "Hi", "parameters": {"max_new_tokens": 5, "stop": "x"}}', 422, "parameters.stop"),
    (b'{"inputs": "Hi", "parameters": {"max_new_tokens": -1}}', 422, "`max_new_tokens` must be strictly positive"),
    (b'{"inputs": "Hi", "parameters": {"max_new_tokens": 100000000}}', 422, "must be <= 200"),
    (b'{"inputs": "Hi", "parameters": {"stop": ["a","b","c","d","e"]}}', 422, "`stop` supports up to 4"),
    (b'{"inputs": "' + b"word " * 300 + b'", "parameters": {"max_new_tokens": 5}}', 422, "`inputs`"),
    (b'{"inputs": "Hi \xc3\x28"}', 422, "UTF-8"),
    (b'{"inputs": "' + b"x" * 30000 + b'"}', 413, "Payload too large"),
]


@pytest.mark.parametrize("raw, status, fragment", BAD)
def test_bad_input_gets_tgi_error_and_server_keeps_serving(client, raw, status, fragment):
    for route in ("/generate", "/generate_stream", "/"):
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (route, r.text)
        body = r.json()
        assert set(body) == {"error", "error_type"} and fragment in body["error"], body
    ok(client)


def test_openai_bad_input(client):
    bad = [
        {"messages": []},
        {"model": "x"},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
        {"messages": [{"role": "wizard", "content": "hi"}]},
    ]
    for body in bad:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 422 and r.json()["error_type"], r.text
    r = client.post("/v1/completions", json={"prompt": "x", "suffix": "y"})
    assert r.status_code == 422
    ok(client)


def test_api_key(server):
    r = httpx.post(server.base_url + "/generate", json={"inputs": "Hi"})
    assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": []},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def _stream_in_thread(base_url: str, body: dict, first_event: threading.Event, results: list) -> None:
    events = []
    with httpx.Client(base_url=base_url, headers=KEY, timeout=120) as c, \
            c.stream("POST", "/generate_stream", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                first_event.set()
    results.append((resp.status_code, events))


def test_overloaded_429_and_nothing_dropped(server, client):
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 80}}
    results: list = []
    threads, firsts = [], []
    for _ in range(3):
        first = threading.Event()
        t = threading.Thread(target=_stream_in_thread, args=(server.base_url, body, first, results))
        t.start()
        threads.append(t)
        firsts.append(first)
    for first in firsts:
        assert first.wait(60)
    r = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 429 and r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    for t in threads:
        t.join(120)
    assert len(results) == 3
    for status, events in results:
        assert status == 200 and events[-1]["generated_text"] is not None and "error" not in events[-1]
    ok(client)
    assert server.metrics()['tgi_request_failure{err="overloaded"}'] >= 1


def test_disconnect_mid_stream_frees_kv_blocks(server, client):
    before = server.metrics()
    assert before["genserve_kv_cache_blocks_used"] == 0
    with client.stream("POST", "/generate_stream", json={"inputs": COUNTING, "parameters": {"max_new_tokens": 150}}) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                seen += 1
                if seen == 3:
                    assert server.metrics()["genserve_kv_cache_blocks_used"] > 0
                    break
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        if m["genserve_kv_cache_blocks_used"] == 0 and m["genserve_num_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["genserve_kv_cache_usage_ratio"] == 0
    assert m['tgi_request_failure{err="cancelled"}'] == before.get('tgi_request_failure{err="cancelled"}', 0) + 1
    ok(client)


def test_json_log_lines(server):
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    requests = [x for x in lines if x.get("target") == "genserve.request"]
    assert requests, server.log()[-2000:]
    last = requests[-1]
    assert last["request_id"] and {"route", "status", "total_time_s", "queue_time_s"} <= set(last["fields"])


def test_sigterm_drains_in_flight_stream(server):
    """Must run last in this module: it stops the server."""
    first = threading.Event()
    results: list = []
    t = threading.Thread(target=_stream_in_thread, args=(
        server.base_url, {"inputs": COUNTING, "parameters": {"max_new_tokens": 40}}, first, results))
    t.start()
    assert first.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert server.proc.wait(60) == 0
    status, events = results[0]
    assert status == 200 and len(events) == 40 and events[-1]["generated_text"]
