"""A real Prometheus (Debian's package, started here on a free port) scraping a real `genserve serve` under load.

One stack per module: a tiny random Llama served with a batch of one (so a queue forms), the operator's
autoscaler gauges fed by the autoscaler's own Prometheus path, and Prometheus evaluating the chart's
rules every second. Nothing waits on a clock: each check polls Prometheus' HTTP API until the state it
looks for shows up, under generous caps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from delivery.support import render_objects
from delivery.test_dashboards import DASHBOARDS, KUBE_STATE_METRICS, exposed_series, metric_names, queries
from held_streams import HeldStreams
from http_server import Server, free_port
from reliability_helpers import wait_for as poll

from genserve.operator import autoscaler, metrics_scrape
from genserve.operator.autoscaler_metrics import AutoscalerMetrics
from genserve.operator.spec import AutoscalingSpec

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")
NAMESPACE, SERVICE, POD = "llm-a", "chat", "chat-0"
CAP_S = 180
# thresholds low enough that a loaded tiny server trips every alert
RULE_VALUES = {"prometheusRule": {"enabled": True, "for": "1s", "queueWaiting": 0, "kvCacheUsage": 0,
                                  "ttftP90Seconds": 0.001}}
ALERTS = {"GenserveServerDown", "GenserveQueueGrowing", "GenserveKvCacheNearFull", "GenserveTimeToFirstTokenHigh",
          "GenserveAutoscalerAtMaxReplicas"}
# the alert's autoscaler: pinned at one replica, so any queue above one request is "at max with a queue"
PINNED = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=1, target_queue_depth=1)


def wait_for(check: Callable[[], object], what: str | Callable[[], str], cap: float = CAP_S, interval: float = 0.5):
    return poll(check, what, cap, interval)


@dataclass
class Prometheus:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def api(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = httpx.get(f"{self.url}/api/v1/{path}{query}", timeout=30).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


def start_prometheus(folder: Path, targets: dict[str, int], operator_port: int, rules: dict) -> Prometheus:
    port = free_port()
    (folder / "rules.yaml").write_text(yaml.safe_dump(rules))
    dead = free_port()  # nothing listens here: the down replica GenserveServerDown must find
    static = [{"targets": [f"127.0.0.1:{p}"], "labels": {"namespace": NAMESPACE, "service": SERVICE, "pod": pod,
                                                          "container": "server"}}
              for pod, p in {**targets, "chat-1": dead}.items()]
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": ["rules.yaml"],
              "scrape_configs": [{"job_name": "genserve", "static_configs": static},
                                 {"job_name": "genserve-operator", "honor_labels": True,
                                  "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]}]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = folder / "prometheus.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([PROMETHEUS, "--config.file=prometheus.yml", "--storage.tsdb.path=data",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(proc, f"http://127.0.0.1:{port}", log_path)

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(prom.url + "/-/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(ready, "Prometheus /-/ready")
    return prom


@dataclass
class Stack:
    server: Server
    prometheus: Prometheus
    operator_metrics: AutoscalerMetrics
    ticks: list[autoscaler.Decision] = field(default_factory=list)

    def autoscaler_tick(self, policy: AutoscalingSpec = PINNED) -> autoscaler.Decision | None:
        """The operator's Prometheus path for one decision, recorded on its /metrics as the operator does."""
        samples, missing = metrics_scrape.query_prometheus(self.prometheus.url, NAMESPACE, SERVICE, [POD], 30)
        if not samples:
            return None
        decision = autoscaler.decide(samples, len(missing), 1, policy, autoscaler.ScalerState(), time.time())
        self.operator_metrics.record(NAMESPACE, SERVICE, policy, decision)
        return decision


@pytest.fixture(scope="module")
def stack(tmp_path_factory, metrics_compat_server) -> Iterator[Stack]:
    server = metrics_compat_server
    operator_metrics = AutoscalerMetrics()
    operator_port = free_port()
    operator_metrics.serve(operator_port, host="127.0.0.1")
    prom = start_prometheus(tmp_path_factory.mktemp("prom"), {POD: int(server.base_url.rsplit(":", 1)[1])},
                            operator_port, _rule_groups())
    try:
        yield Stack(server, prom, operator_metrics)
    finally:
        prom.proc.terminate()
        try:
            prom.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.proc.kill()


def _rule_groups() -> dict:
    (rule,) = [o for o in render_objects(RULE_VALUES) if o["kind"] == "PrometheusRule"]
    return rule["spec"]


def test_prometheus_holds_every_series_the_server_exports(stack):
    # one failure, so the labelled failure counter has a series too
    bad = httpx.post(stack.server.base_url + "/generate", json={"inputs": "x", "parameters": {"temperature": -1}},
                     timeout=60)
    assert bad.status_code == 422
    text = httpx.get(stack.server.base_url + "/metrics", timeout=30).text
    # families with samples (a labelled family seen no label set yet has none to scrape)
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    assert exported <= exposed_series(text)
    assert {"tgi_queue_size", "tgi_request_count", "tgi_request_failure", "genserve_kv_cache_usage_ratio"} <= exported

    def missing() -> set[str]:
        scraped = set(stack.prometheus.api("label/__name__/values"))
        return exported - scraped
    wait_for(lambda: not missing(), lambda: f"exported families not in Prometheus: {sorted(missing())}")
    assert {n for n in exported if n.startswith("vllm:")} >= {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
    (sample,) = stack.prometheus.query(f'tgi_request_failure{{pod="{POD}",err="validation"}}')
    assert sample["metric"]["service"] == SERVICE and float(sample["value"][1]) >= 1


def test_chart_rules_load_and_evaluate(stack):
    def evaluated() -> list[dict]:
        rules = [r for g in stack.prometheus.api("rules")["groups"] for r in g["rules"]]
        done = all(not r["lastEvaluation"].startswith("0001-") for r in rules)
        return rules if rules and done else []
    rules = wait_for(evaluated, "a first evaluation of every rule")
    assert {r["name"] for r in rules} == ALERTS
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules
    # the replica nobody answers for is down (pending: the chart holds this one 5 min); the live one is not
    def down() -> set[str]:
        return {a["labels"]["pod"] for a in stack.prometheus.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "GenserveServerDown" and a["state"] in ("pending", "firing")}
    wait_for(lambda: "chat-1" in down(), "GenserveServerDown active on the dead replica")
    assert down() == {"chat-1"}


def test_under_load_alerts_fire_dashboards_answer_and_the_autoscaler_reads_prometheus(stack):
    load = HeldStreams(stack.server.base_url)
    seen_firing: set[str] = set()
    dashboard_exprs = _dashboard_queries()
    answered: set[str] = set()
    try:
        # grow the queue step by step (a target that rises by one per round), so deriv(queue) > 0 whatever
        # the machine's speed; each round also runs an autoscaler tick and looks at alerts and panels
        target, vllm_queue_seen = 0, False

        def round_done() -> bool:
            nonlocal target
            waiting = metrics_scrape.scrape(stack.server.base_url + "/metrics", 30).waiting
            if target < 24:
                target += 1
                for _ in range(max(0, target - int(waiting))):
                    load.add()
            stack.autoscaler_tick()
            seen_firing.update(a["labels"]["alertname"] for a in stack.prometheus.api("alerts")["alerts"]
                               if a["state"] == "firing" or a["labels"]["alertname"] == "GenserveServerDown")
            for expr in dashboard_exprs - answered:
                if stack.prometheus.query(expr):
                    answered.add(expr)
            nonlocal vllm_queue_seen
            # the endpoint picker's signal, scraped in the same sample as genserve's own gauge
            same = stack.prometheus.query(f'vllm:num_requests_waiting{{pod="{POD}"}} - ignoring(model_name, engine) '
                                          f'genserve_num_requests_waiting{{pod="{POD}"}}')
            queued = stack.prometheus.query(f'vllm:num_requests_waiting{{pod="{POD}"}} > 0')
            assert not same or float(same[0]["value"][1]) == 0, same
            vllm_queue_seen = vllm_queue_seen or bool(same and queued)
            return seen_firing >= ALERTS and answered == dashboard_exprs and vllm_queue_seen
        wait_for(round_done, "every alert firing and every dashboard panel answering", interval=0.2)

        # the autoscaler's Prometheus source and a direct scrape of the pod agree on a settled queue
        policy = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=64, target_queue_depth=1,
                                 max_scale_up_step=64, target_kv_cache_usage=1.0)

        def same_decision() -> tuple[autoscaler.Decision, autoscaler.Decision] | None:
            before = metrics_scrape.scrape(stack.server.base_url + "/metrics", 30)
            from_prometheus, _ = metrics_scrape.query_prometheus(stack.prometheus.url, NAMESPACE, SERVICE, [POD], 30)
            after = metrics_scrape.scrape(stack.server.base_url + "/metrics", 30)
            if before.waiting < 4:  # keep a queue to read
                for _ in range(4):
                    load.add()
                return None
            settled = [(s.waiting, s.running) for s in (before, *from_prometheus, after)]
            if len(set(settled)) != 1 or len(settled) != 3:
                return None
            now = time.time()
            direct = autoscaler.decide([after], 0, 1, policy, autoscaler.ScalerState(), now)
            scraped = autoscaler.decide(from_prometheus, 0, 1, policy, autoscaler.ScalerState(), now)
            return direct, scraped
        direct, scraped = wait_for(same_decision, "a queue Prometheus and the pod both report", interval=0.1)
        assert (scraped.desired, scraped.reason, scraped.queue_depth, scraped.running) == \
               (direct.desired, direct.reason, direct.queue_depth, direct.running)
        assert scraped.reason == "ScaleUp" and scraped.desired == -(-(direct.queue_depth + direct.running) // 2)
    finally:
        load.close()
    at_max = stack.prometheus.query("ALERTS{alertname=\"GenserveAutoscalerAtMaxReplicas\"}")
    assert not at_max or at_max[0]["metric"]["service"] == SERVICE


def _dashboard_queries() -> set[str]:
    """Every panel query of both dashboards as Grafana would send it for all namespaces and services,
    except those on kube-state-metrics (not run here)."""
    out = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for expr in queries(dashboard):
            if metric_names(expr) & KUBE_STATE_METRICS:
                continue
            out.add(expr.replace("$__rate_interval", "30s").replace("$namespace", ".*").replace("$service", ".*")
                    .replace("$target_queue_depth", "5"))
    assert len(out) > 30
    return out
