"""The chart's alert rules under Prometheus' own rule engine (`promtool test rules`), one case per alert that
fires and one that does not, and the operator's /metrics that the max-replicas alert reads."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
import yaml

from genserve.operator.autoscaler import Decision
from genserve.operator.autoscaler_metrics import AutoscalerMetrics
from genserve.operator.spec import AutoscalingSpec

from .support import find, render_objects

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
RULE_VALUES = {"prometheusRule": {"enabled": True, "for": "10m"}}
OPERATOR = 'namespace="llm-a",service="chat",job="genserve-operator",pod="genserve-7f9c"'


def rule_groups(values: dict = RULE_VALUES) -> dict:
    (rule,) = find(render_objects(values), "PrometheusRule")
    return rule["spec"]


def operator_series(desired: str, maximum: str, queue: str, target: str = "4x40") -> list[dict]:
    """The operator's gauges as promtool input (`a+bxN` expands to N+1 samples a, a+b, ...)."""
    return [{"series": f"genserve_autoscaler_{name}{{{OPERATOR}}}", "values": values}
            for name, values in (("desired_replicas", desired), ("max_replicas", maximum),
                                 ("queue_depth", queue), ("target_queue_depth", target))]


def promtool_test(tmp_path, groups: dict, tests: list[dict]) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    check = subprocess.run([PROMTOOL, "check", "rules", "rules.yaml"], capture_output=True, text=True, timeout=60,
                           cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    result = subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def at_max(eval_time: str, fires: bool, value: int = 0) -> dict:
    alert = {"exp_labels": {"severity": "warning", "namespace": "llm-a", "service": "chat",
                            "job": "genserve-operator", "pod": "genserve-7f9c"},
             "exp_annotations": {"summary": f"llm-a/chat: at maxReplicas and {value} requests still waiting; "
                                            "raise spec.autoscaling.maxReplicas or add capacity"}}
    return {"eval_time": eval_time, "alertname": "GenserveAutoscalerAtMaxReplicas",
            "exp_alerts": [alert] if fires else []}


@needs_promtool
def test_max_replicas_alert_fires_only_when_pinned_with_a_queue(tmp_path):
    groups = rule_groups()
    tests = [
        # pinned at 8 of 8 with 50 waiting (target 4 x 8 = 32): pending until 10 min have passed, then firing
        {"interval": "1m", "input_series": operator_series("8x40", "8x40", "50x40"),
         "alert_rule_test": [at_max("9m", fires=False), at_max("15m", fires=True, value=50)]},
        # at max but the queue is within target: capacity suffices, nothing to say
        {"interval": "1m", "input_series": operator_series("8x40", "8x40", "20x40"),
         "alert_rule_test": [at_max("20m", fires=False)]},
        # a long queue while still below max: the autoscaler can still add replicas
        {"interval": "1m", "input_series": operator_series("5x40", "8x40", "90x40"),
         "alert_rule_test": [at_max("20m", fires=False)]},
        # pinned, queue over target for 6 min then drained: the hold restarts, no alert
        {"interval": "1m", "input_series": operator_series("8x40", "8x40", "50x5 10x5 50x5"),
         "alert_rule_test": [at_max("16m", fires=False)]},
    ]
    promtool_test(tmp_path, groups, tests)


@needs_promtool
def test_every_alert_has_a_firing_and_a_quiet_case(tmp_path):
    """Each chart alert on its own signal, and none of them on a healthy service with the same series."""
    labels = 'namespace="llm-a",service="chat",pod="chat-0"'
    ttft = 'genserve_time_to_first_token_seconds_bucket{' + labels + ',le="%s"}'

    def series(up, kv, waiting, fast_ttft, desired):
        return [{"series": 'up{container="server",namespace="llm-a",pod="chat-0"}', "values": up},
                {"series": "genserve_kv_cache_usage_ratio{" + labels + "}", "values": kv},
                {"series": "genserve_num_requests_waiting{" + labels + "}", "values": waiting},
                {"series": ttft % "1", "values": "0+10x40" if fast_ttft else "0+0x40"},
                {"series": ttft % "5", "values": "0+10x40"}, {"series": ttft % "+Inf", "values": "0+10x40"},
                *operator_series(desired, "8x40", waiting)]

    groups = rule_groups()
    names = [r["alert"] for g in groups["groups"] for r in g["rules"]]
    assert len(names) == 5 and "GenserveAutoscalerAtMaxReplicas" in names
    busy = series("0x40", "0.97x40", "30+1x40", fast_ttft=False, desired="8x40")
    healthy = series("1x40", "0.5x40", "25x40", fast_ttft=True, desired="6x40")

    def fired(name: str) -> dict:
        return {"eval_time": "25m", "alertname": name, "exp_alerts": [{"exp_labels": {}}]}

    # exp_labels must be exact in promtool, so the firing case checks the alert by name with its labels
    expected = {
        "GenserveServerDown": {"severity": "critical", "container": "server", "namespace": "llm-a", "pod": "chat-0"},
        "GenserveQueueGrowing": {"severity": "warning", "namespace": "llm-a", "service": "chat"},
        "GenserveKvCacheNearFull": {"severity": "warning", "namespace": "llm-a", "service": "chat"},
        "GenserveTimeToFirstTokenHigh": {"severity": "warning", "namespace": "llm-a", "service": "chat"},
        "GenserveAutoscalerAtMaxReplicas": {"severity": "warning", "namespace": "llm-a", "service": "chat",
                                            "job": "genserve-operator", "pod": "genserve-7f9c"},
    }
    assert set(expected) == set(names)
    firing = []
    for name, exp in expected.items():
        case = fired(name)
        case["exp_alerts"][0]["exp_labels"] = exp
        firing.append(case)
    quiet = [{"eval_time": "25m", "alertname": name, "exp_alerts": []} for name in names]
    annotations_free = {"groups": [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"}
                                                   for r in g["rules"]]} for g in groups["groups"]]}
    promtool_test(tmp_path, annotations_free, [
        {"interval": "1m", "input_series": busy, "alert_rule_test": firing},
        {"interval": "1m", "input_series": healthy, "alert_rule_test": quiet}])


def test_operator_metrics_expose_the_decision():
    metrics = AutoscalerMetrics()
    policy = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=8, target_queue_depth=4)
    metrics.record("llm-a", "chat", policy, Decision(8, "AtMaxReplicas", "", queue_depth=50, running=64))
    port = _free_port()
    metrics.serve(port, host="127.0.0.1")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    got = _samples(text)
    key = '{namespace="llm-a",service="chat"}'
    assert got[f"genserve_autoscaler_desired_replicas{key}"] == 8
    assert got[f"genserve_autoscaler_max_replicas{key}"] == 8
    assert got[f"genserve_autoscaler_min_replicas{key}"] == 1
    assert got[f"genserve_autoscaler_target_queue_depth{key}"] == 4
    assert got[f"genserve_autoscaler_queue_depth{key}"] == 50
    assert got[f"genserve_autoscaler_running_requests{key}"] == 64
    # a tick without metrics drops the load series; a deleted service drops them all
    metrics.record("llm-a", "chat", policy, Decision(8, "MetricsUnavailable", ""))
    got = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
    assert f"genserve_autoscaler_queue_depth{key}" not in got and got[f"genserve_autoscaler_max_replicas{key}"] == 8
    # what the operator's daemon calls after each tick: the bounds come from the resource's spec
    body = {"metadata": {"namespace": "llm-a", "name": "chat"},
            "spec": {"model": {"id": "x"}, "autoscaling": {"enabled": True, "maxReplicas": 6, "targetQueueDepth": 2}}}
    metrics.observe(body, Decision(6, "AtMaxReplicas", "", queue_depth=30, running=12), "img")
    got = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
    assert got[f"genserve_autoscaler_max_replicas{key}"] == 6 and got[f"genserve_autoscaler_target_queue_depth{key}"] == 2
    assert got[f"genserve_autoscaler_queue_depth{key}"] == 30
    metrics.observe({"metadata": {"namespace": "llm-a", "name": "chat"}, "spec": {"model": {"id": "x"}}}, None, "img")
    assert not [k for k in _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
                if k.startswith("genserve_autoscaler_")]


def test_operator_pod_monitor_scrapes_the_metrics_port():
    objects = render_objects({"operatorPodMonitor": {"enabled": True}})
    (monitor,) = [m for m in find(objects, "PodMonitor") if m["metadata"]["name"].endswith("-operator")]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    (deployment,) = find(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {"name": "GENSERVE_OPERATOR_METRICS_PORT", "value": "8081"} in container["env"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
