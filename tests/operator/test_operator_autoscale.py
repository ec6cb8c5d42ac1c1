"""The autoscaler daemon of the real operator: pods in the emulator whose IPs and ports point at real local
HTTP endpoints serving Prometheus text that the test controls."""

from __future__ import annotations

import time

import pytest
from harness import MetricsEndpoint, add_ready_pod, replicas, tgs_body, tgs_status, wait_for
from kubernetes import client

GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
INTERVAL, DOWN_WINDOW = 1, 3


def scaling_condition(api, namespace: str) -> dict | None:
    return next((c for c in tgs_status(api, namespace).get("conditions", []) if c["type"] == "ScalingActive"), None)


@pytest.fixture()
def endpoints():
    eps = [MetricsEndpoint() for _ in range(2)]
    for ep in eps:
        ep.set(waiting=0, running=2)
    yield eps
    for ep in eps:
        if ep.server.socket.fileno() != -1:
            ep.stop()


def start_autoscaled(api, cluster, namespace, endpoints, down_window: int = DOWN_WINDOW):
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tgs_body(
        "chat", {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "shards": 1, "autoscaling": {
            "enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetQueueDepth": 4, "intervalSeconds": INTERVAL,
            "scaleDownStabilizationSeconds": down_window, "maxScaleUpStep": 4, "maxScaleDownStep": 1}}))
    wait_for(lambda: cluster.get("apps/v1/deployments", namespace, "chat"), what="the Deployment")
    assert replicas(cluster, namespace) == 2  # starts at minReplicas
    for i, ep in enumerate(endpoints):
        add_ready_pod(api, namespace, "chat", f"chat-{i}", ep.port)
    wait_for(lambda: tgs_status(api, namespace).get("runningRequests") == 4, what="the first scrape")
    return endpoints


@pytest.fixture()
def autoscaled(operator, api, cluster, namespace, endpoints):
    return start_autoscaled(api, cluster, namespace, endpoints)


def test_queue_rise_scales_up(autoscaled, api, cluster, namespace):
    for ep in autoscaled:
        ep.set(waiting=16, running=8)  # demand 48 over (8 running + 4 queued) per replica -> 4 replicas
    wait_for(lambda: replicas(cluster, namespace) == 4, what="scale-up to 4")
    status = tgs_status(api, namespace)
    assert status["desiredReplicas"] == 4 and status["queueDepth"] == 32
    assert status["lastScaleDecision"]["reason"] == "ScaleUp"
    assert status["lastScaleDecision"]["fromReplicas"] == 2 and status["lastScaleDecision"]["toReplicas"] == 4
    assert status["lastScaleTime"]
    events = wait_for(lambda: [e for e in cluster.list("v1/events", namespace) if e.get("reason") == "Scaled"],
                      what="the Scaled event")  # kopf posts events in the background
    assert "2 -> 4 replicas" in events[-1]["message"]


def test_queue_fall_scales_down_only_after_the_window(autoscaled, api, cluster, namespace):
    for ep in autoscaled:
        ep.set(waiting=16, running=8)
    wait_for(lambda: replicas(cluster, namespace) == 4, what="scale-up to 4")
    high = autoscaled[0].text
    for ep in autoscaled:
        ep.set(waiting=0, running=1)
    seen = []

    def scaled_down() -> bool:
        # replicas first: status is written before the scale, so a later Stabilizing means none happened yet
        count = replicas(cluster, namespace)
        condition = scaling_condition(api, namespace)
        seen.append((count, condition and condition["reason"]))
        return count == 3
    wait_for(scaled_down, what="scale-down")
    down_at = time.monotonic()
    # the window counts from the last high sample the autoscaler took (a slow tick may come late)
    last_high = max(t for ep in autoscaled for t, text in ep.served if text == high)
    assert down_at - last_high >= DOWN_WINDOW
    assert all(count == 4 for count, reason in seen if reason == "ScaleDownStabilizing"), seen
    wait_for(lambda: replicas(cluster, namespace) == 2, what="down to minReplicas")
    time.sleep(INTERVAL * 1.5)
    assert replicas(cluster, namespace) == 2  # never below minReplicas


def test_unreachable_endpoints_change_nothing_and_say_why(autoscaled, api, cluster, namespace):
    for ep in autoscaled:
        ep.set(waiting=16, running=8)
    wait_for(lambda: replicas(cluster, namespace) == 4, what="scale-up to 4")
    for ep in autoscaled:
        ep.stop()
    condition = wait_for(lambda: (c := scaling_condition(api, namespace)) and c["reason"] == "MetricsUnavailable"
                         and c, what="MetricsUnavailable")
    assert condition["status"] == "False"
    assert "keeping 4 replicas" in condition["message"] and "unreachable: chat-0" in condition["message"]
    time.sleep(DOWN_WINDOW + INTERVAL)  # longer than the down window: still no change
    assert replicas(cluster, namespace) == 4
    assert scaling_condition(api, namespace)["reason"] == "MetricsUnavailable"


def test_autoscaling_off_reports_inactive_and_uses_spec_replicas(operator, api, cluster, namespace):
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tgs_body(
        "chat", {"model": {"id": "m"}, "shards": 0, "replicas": 3}))
    wait_for(lambda: (c := scaling_condition(api, namespace)) and c["reason"] == "AutoscalingDisabled",
             what="ScalingActive=False")
    assert replicas(cluster, namespace) == 3


def scale_patches(cluster, namespace: str, since: int) -> list[int]:
    """The replica counts the autoscaler set on the Deployment (its merge patches) since request `since`."""
    return [r.data["spec"]["replicas"] for r in cluster.operator_requests()
            if r.id >= since and r.namespace == namespace and r.method.value == "PATCH" and r.resource
            and r.resource.plural == "deployments" and "merge-patch" in (r.headers.get("Content-Type") or "")
            and isinstance(r.data, dict) and "replicas" in (r.data.get("spec") or {})]


def test_a_flapping_metric_does_not_flap_replicas(operator, api, cluster, namespace, endpoints):
    """Every scrape alternates between a load that wants 6 replicas and an idle one: scaling up is allowed
    at once (to 6), scaling down never happens while a high sample is inside the down window (60 s here:
    far longer than a tick, even a slow one on a busy machine)."""
    autoscaled = start_autoscaled(api, cluster, namespace, endpoints, down_window=60)
    high, low = MetricsEndpoint.render(waiting=40, running=8), MetricsEndpoint.render(waiting=0, running=0)
    start = len(cluster.cluster._requests)
    for ep in autoscaled:
        ep.scrapes = 0
        ep.sequence = [high, low]
    scrapes = 8
    wait_for(lambda: all(ep.scrapes >= scrapes for ep in autoscaled), what=f"{scrapes} noisy scrapes")
    counts = scale_patches(cluster, namespace, start)
    # up (once, or twice if the two pods' alternations were out of step), never down: no flapping
    assert counts and counts == sorted(set(counts)) and counts[-1] == 6, counts
    assert replicas(cluster, namespace) == 6


def test_a_pod_that_does_not_answer_is_skipped_and_only_holds_scale_down(autoscaled, api, cluster, namespace):
    silent, answering = autoscaled
    silent.hang.set()  # accepts the connection, never answers: the scrape times out
    answering.set(waiting=40, running=8)  # alone it asks for 4 replicas
    wait_for(lambda: replicas(cluster, namespace) == 4, what="a scale-up from the pod that answered")
    decision = tgs_status(api, namespace)["lastScaleDecision"]
    assert decision["reason"] == "ScaleUp" and "unreachable: chat-0" in decision["message"]
    answering.set(waiting=0, running=0)  # idle, but one ready pod is unknown: no scale-down on missing data
    condition = wait_for(lambda: (c := scaling_condition(api, namespace)) and c["reason"] == "PartialMetrics"
                         and c, what="PartialMetrics")
    assert "not scaling down" in condition["message"] and "chat-0" in condition["message"]
    start = len(cluster.cluster._requests)
    time.sleep(DOWN_WINDOW + 2 * INTERVAL)  # past the down window: still held
    assert replicas(cluster, namespace) == 4 and not scale_patches(cluster, namespace, start)
    silent.hang.clear()
    silent.set(waiting=0, running=0)
    wait_for(lambda: replicas(cluster, namespace) == 3, what="scale-down once every pod answers")
