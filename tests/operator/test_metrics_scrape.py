"""Reading load from /metrics: genserve names first, TGI names as fallback, failures are reported."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from harness import MetricsEndpoint

from genserve.operator.metrics_scrape import (
    is_pod_ready,
    metrics_url,
    parse_metrics,
    query_prometheus,
    scrape_activator,
    scrape_pods,
)

GENSERVE_AND_TGI = """\
# HELP genserve_num_requests_waiting Requests waiting.
# TYPE genserve_num_requests_waiting gauge
genserve_num_requests_waiting{model="a"} 3
genserve_num_requests_waiting{model="b"} 2
# TYPE genserve_num_requests_running gauge
genserve_num_requests_running 7
# TYPE genserve_kv_cache_usage_ratio gauge
genserve_kv_cache_usage_ratio 0.5
# TYPE tgi_queue_size gauge
tgi_queue_size 99
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="+Inf"} 4
tgi_request_duration_count 4
tgi_request_duration_sum 1.5
"""


def pod(name: str, port: int, ready: bool = True, ip: str = "127.0.0.1") -> dict:
    return {"metadata": {"name": name},
            "spec": {"containers": [{"name": "server", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_genserve_names_win_and_label_sets_are_summed():
    sample = parse_metrics(GENSERVE_AND_TGI)
    assert (sample.waiting, sample.running, sample.kv_cache_usage) == (5, 7, 0.5)


def test_tgi_names_are_the_fallback():
    sample = parse_metrics("tgi_queue_size 4\ntgi_batch_current_size 16\n")
    assert (sample.waiting, sample.running, sample.kv_cache_usage) == (4, 16, None)


def test_the_request_counter_is_read_as_our_server_writes_it():
    # TGI's name, no _total suffix, typed counter: how genserve serves it
    text = "# TYPE tgi_request_count counter\ntgi_request_count 12\n# TYPE tgi_queue_size gauge\ntgi_queue_size 0\n"
    assert parse_metrics(text).requests_total == 12
    assert parse_metrics("tgi_queue_size 0\n").requests_total is None


def test_activator_metrics_are_scraped_on_its_metrics_port():
    endpoint = MetricsEndpoint("# TYPE genserve_activator_requests_waiting gauge\n"
                               "genserve_activator_requests_waiting 2\n")
    try:
        activator = pod("act", 1)
        activator["spec"]["containers"][0]["ports"].append({"name": "metrics", "containerPort": endpoint.port})
        assert scrape_activator([activator], timeout=30) == 2  # a cap: a busy machine answers late
        gone = pod("gone", 1)
        gone["spec"]["containers"][0]["ports"].append({"name": "metrics", "containerPort": 1})
        assert scrape_activator([gone], timeout=0.5) is None  # unreachable: no data, not "zero held"
        assert scrape_activator([], timeout=0.5) is None
    finally:
        endpoint.stop()


def test_metrics_without_a_queue_gauge_are_an_error():
    with pytest.raises(ValueError, match="tgi_queue_size"):
        parse_metrics("tgi_request_count 3\n")


def test_pod_readiness_and_url():
    assert is_pod_ready(pod("a", 1))
    assert not is_pod_ready(pod("a", 1, ready=False))
    assert not is_pod_ready({"metadata": {"name": "a"}, "status": {"conditions": []}})
    assert metrics_url(pod("a", 9000)) == "http://127.0.0.1:9000/metrics"
    assert metrics_url(pod("a", 9000, ip="fd00::1")) == "http://[fd00::1]:9000/metrics"


def test_scrape_pods_over_http_reports_unreachable_ones():
    up, down = MetricsEndpoint(), MetricsEndpoint()
    up.set(waiting=6, running=8, kv=0.25)
    down.stop()
    samples, errors = scrape_pods([pod("up", up.port), pod("down", down.port)], timeout=30)  # "down" is refused
    up.stop()
    assert [(s.waiting, s.running, s.kv_cache_usage) for s in samples] == [(6, 8, 0.25)]
    assert list(errors) == ["down"] and "URLError" in errors["down"]


def test_query_prometheus_builds_per_pod_samples():
    queries = []

    class Prometheus(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            queries.append(self.path)
            metric = "waiting" if "waiting" in self.path else "running" if "running" in self.path else "kv"
            values = {"waiting": {"p1": 3, "p2": 0}, "running": {"p1": 8, "p2": 2}, "kv": {"p1": 0.7}}[metric]
            body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": {"pod": p}, "value": [0, str(v)]} for p, v in values.items()]}}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Prometheus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        samples, absent = query_prometheus(f"http://127.0.0.1:{server.server_address[1]}", "ns", "llama",
                                           ["p1", "p2", "p3"], timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert [(s.waiting, s.running, s.kv_cache_usage) for s in samples] == [(3, 8, 0.7), (0, 2, None)]
    # a ready pod without series is missing data (never an idle replica that could be scaled away)
    assert absent == ["p3"]
    assert all("namespace%3D%22ns%22" in q and "service%3D%22llama%22" in q for q in queries)
