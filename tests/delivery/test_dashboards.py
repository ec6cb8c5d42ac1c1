"""Grafana dashboards: well-formed, and every query names metrics the server (or kube-state-metrics) exports."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .support import CHART, ROOT

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))

# The server's metric families (TGI's names kept, genserve_* added); see shared REFERENCE.md.
SERVER_HISTOGRAMS = {
    "tgi_request_duration", "tgi_request_validation_duration", "tgi_request_queue_duration",
    "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration", "tgi_request_input_length",
    "tgi_request_generated_tokens", "tgi_request_max_new_tokens", "tgi_batch_forward_duration",
    "genserve_time_to_first_token_seconds", "genserve_inter_token_latency_seconds",
}
SERVER_SERIES = {
    "tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens", "tgi_request_count",
    "tgi_request_success", "tgi_request_failure", "tgi_batch_inference_count",
    "genserve_kv_cache_usage_ratio", "genserve_num_requests_waiting", "genserve_num_requests_running",
    "genserve_num_preemptions_total", "genserve_prefix_cache_queries_total", "genserve_prefix_cache_hits_total",
    "genserve_prompt_tokens_total", "genserve_generation_tokens_total",
} | {f"{h}_{s}" for h in SERVER_HISTOGRAMS for s in ("bucket", "sum", "count")}
# Replica counts of each service's Deployment come from kube-state-metrics (the operator names it after the service).
KUBE_STATE_METRICS = {
    "kube_deployment_spec_replicas", "kube_deployment_status_replicas", "kube_deployment_status_replicas_ready",
    "kube_deployment_status_replicas_available", "kube_deployment_status_replicas_unavailable",
    "kube_deployment_status_replicas_updated",
}

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, labels, keywords and variables removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    text = re.sub(r"\{[^{}]*\}", "", text)                    # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                    # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)                   # Grafana variables
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?(ms|s|m|h|d|w|y)?\b", "", text)  # numbers, durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end():].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def queries(dashboard: dict) -> list[str]:
    found = []

    def walk(panels):
        for panel in panels:
            found.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    found.extend(a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr"))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            text = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", text)
            found.append(inner.group(1) if inner else text)
    return found


def all_metric_names(dashboard: dict) -> set[str]:
    return set().union(*(metric_names(q) for q in queries(dashboard)))


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.9, sum by (le, service) (rate(genserve_time_to_first_token_seconds_bucket'
            '{namespace=~"$namespace", service=~"$service"}[$__rate_interval]))) / clamp_min(count by (x) '
            '(tgi_queue_size offset 5m), 1) + vector($target)')
    assert metric_names(expr) == {"genserve_time_to_first_token_seconds_bucket", "tgi_queue_size"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_well_formed(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"].startswith("genserve")
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "service"} <= variables
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_uses_only_known_metrics(path):
    names = all_metric_names(json.loads(path.read_text()))
    assert names
    unknown = names - SERVER_SERIES - KUBE_STATE_METRICS
    assert not unknown, f"{path.name} queries metrics nobody exports: {sorted(unknown)}"


def test_model_dashboard_covers_the_issue():
    names = all_metric_names(json.loads((CHART / "dashboards" / "model.json").read_text()))
    wanted = {
        "request rate": "tgi_request_count", "errors by type": "tgi_request_failure",
        "TTFT": "genserve_time_to_first_token_seconds_bucket", "ITL": "genserve_inter_token_latency_seconds_bucket",
        "queue depth": "genserve_num_requests_waiting", "batch size": "tgi_batch_current_size",
        "KV cache": "genserve_kv_cache_usage_ratio", "tokens/s": "genserve_generation_tokens_total",
        "prefill vs decode": "tgi_batch_forward_duration_sum",
    }
    assert not {topic for topic, metric in wanted.items() if metric not in names}


def test_fleet_dashboard_covers_the_issue():
    dashboard = json.loads((CHART / "dashboards" / "fleet.json").read_text())
    names = all_metric_names(dashboard)
    assert {"kube_deployment_spec_replicas", "kube_deployment_status_replicas_ready",
            "genserve_num_requests_waiting"} <= names
    assert "target_queue_depth" in {v["name"] for v in dashboard["templating"]["list"]}
    assert any("changes(kube_deployment_spec_replicas" in q for q in queries(dashboard)), "scale events"


# --- live check against the real server ------------------------------------------------------------------------


def _genserve() -> Path:
    return Path(sys.executable).parent / "genserve"


def _has_serve() -> bool:
    if not _genserve().exists():
        return False
    result = subprocess.run([str(_genserve()), "serve", "--help"], capture_output=True, text=True, timeout=60)
    return result.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def exposed_series(text: str) -> set[str]:
    """Series names a PromQL query can select from a text exposition, including families with no sample yet."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind in ("histogram", "summary"):
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return names


class _AnyStats:
    def __getattr__(self, name):
        return 0


class _FakeEngine:
    def __init__(self):
        self.step_observers = []

    def stats(self):
        return _AnyStats()


def test_dashboard_metrics_exist_in_server_exposition():
    """Fast check with the server's own metrics module (the live test below runs the whole server)."""
    metrics_module = pytest.importorskip("genserve.server.metrics", reason="server metrics module not built yet")
    metrics = metrics_module.Metrics()
    metrics.bind_engine(_FakeEngine())
    live = exposed_series(metrics.render().decode())
    for path in DASHBOARDS:
        missing = sorted(all_metric_names(json.loads(path.read_text())) - KUBE_STATE_METRICS - live)
        assert not missing, f"{path.name} queries metrics the server does not export: {missing}"


@pytest.mark.slow
def test_dashboard_metrics_exist_on_live_server(tmp_path):
    if not _has_serve():
        pytest.skip("`genserve serve` does not exist yet in this checkout (the server is built concurrently)")
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(_genserve()), "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if _request(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server not healthy after 240 s"
            time.sleep(1)
        # one success, one streamed request and one validation failure, so labelled series exist
        assert _request(base + "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 4}})[0] == 200
        _request(base + "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
        assert _request(base + "/generate", {"inputs": "x", "parameters": {"temperature": -1}})[0] == 422
        status, text = _request(base + "/metrics")
        assert status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    live = exposed_series(text)
    for path in DASHBOARDS:
        names = all_metric_names(json.loads(path.read_text())) - KUBE_STATE_METRICS
        missing = sorted(names - live)
        assert not missing, f"{path.name} queries metrics the server does not export: {missing}"
