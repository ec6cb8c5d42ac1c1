"""Real HTTP, graceful termination on a tensor-parallel server (--num-shard 2, gloo; rank 0 runs the same
HTTP server as one shard does): on SIGTERM /health turns 503 (/live stays 200), new requests get a 503 `unhealthy` error,
in-flight requests (streams and JSON) run to their end with their uninterrupted answers, then the server
exits 0 and its worker with it. (A worker killed mid-stream: test_tensor_parallel.py.)"""

from __future__ import annotations

import re
import signal
import threading

import httpx
import pytest
from http_server import start_server
from reliability_helpers import StreamInThread, generated_ids, metrics, save_tiny_model, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["Count from 1 to 1000: 1, 2, 3,", "Once upon a time"]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-reliability"), smollm2_dir)


def _uninterrupted(base_url: str, prompt: str) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
    r = httpx.post(base_url + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def _drain_check(server) -> None:
    """Streams and a JSON request in flight, SIGTERM, then the 503s, every answer whole, exit 0."""
    url = server.base_url
    expected = [_uninterrupted(url, p) for p in PROMPTS]
    streams = [StreamInThread(url, {"inputs": p, "parameters": {"max_new_tokens": NEW_TOKENS}}) for p in PROMPTS]
    for s in streams:
        assert s.first.wait(300) and s.error is None, s.error
    plain: list = []
    json_call = threading.Thread(target=lambda: plain.append(_uninterrupted(url, PROMPTS[0])), daemon=True)
    json_call.start()
    wait_for(lambda: (m := metrics(url))["tgi_batch_current_size"] + m["tgi_queue_size"] >= 3, "3 in flight")
    server.proc.send_signal(signal.SIGTERM)
    health = wait_for(lambda: (h := httpx.get(url + "/health", timeout=30)).status_code == 503 and h, "health 503")
    assert health.json()["error_type"] == "unhealthy"
    assert httpx.get(url + "/live", timeout=30).status_code == 200  # liveness: a long drain is no reason to kill
    for route, body in [("/generate", {"inputs": "Hi"}), ("/v1/chat/completions",
                                                        {"messages": [{"role": "user", "content": "Hi"}]})]:
        r = httpx.post(url + route, json=body, timeout=30)
        assert r.status_code == 503, r.text
        assert r.json() == {"error": "Server is shutting down: it accepts no new requests",
                            "error_type": "unhealthy"}
    assert httpx.get(url + "/metrics", timeout=30).status_code == 200  # scrapes go on while draining
    for s, ids in zip(streams, expected, strict=True):
        s.join()
        assert s.error is None and s.status == 200, s.error
        assert s.events[-1]["generated_text"] is not None and generated_ids(s.events) == ids
    json_call.join(300)
    assert plain == [expected[0]]
    assert server.proc.wait(120) == 0, server.log()[-3000:]
    assert "drained: every in-flight request finished" in server.log()


def test_sigterm_on_a_tensor_parallel_server_drains_then_exits_0(tmp_path, tiny_dir):
    server = start_server(tmp_path, "--model-id", str(tiny_dir), "--num-shard", "2", "--num-threads", "1",
                          "--graceful-termination-timeout", "300")
    try:
        workers = _worker_pids(server.log())
        assert len(workers) == 1
        _drain_check(server)
        wait_for(lambda: not _is_running(workers[0]), "the worker to exit")
    finally:
        server.stop()


def _worker_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"started tensor-parallel worker rank \d+ \(pid (\d+)\)", log)]


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False
