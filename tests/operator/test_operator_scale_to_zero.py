"""Scale to zero with the real operator against kmock: idle -> 0 replicas with the Service on the activator,
a request held by the activator -> 1 replica, a ready pod -> the Service back on the server pods.
Pods and Deployment status are played by the test (kmock runs no controllers), with real HTTP metrics."""

from __future__ import annotations

import time

import pytest
from harness import MetricsEndpoint, add_ready_pod, replicas, tgs_body, tgs_status, wait_for
from kubernetes import client

GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
IDLE_SECONDS = 10  # the CRD's minimum


def server_metrics(requests: int, running: int = 0) -> str:
    return ("# TYPE genserve_num_requests_waiting gauge\ngenserve_num_requests_waiting 0\n"
            f"# TYPE genserve_num_requests_running gauge\ngenserve_num_requests_running {running}\n"
            f"# TYPE tgi_request_count counter\ntgi_request_count {requests}\n")


def service_selector(cluster, namespace: str) -> dict:
    return cluster.get("v1/services", namespace, "chat")["spec"]["selector"]


def set_deployment_status(api, namespace: str, ready: int) -> None:
    client.AppsV1Api(api).patch_namespaced_deployment_status("chat", namespace, {"status": {
        "replicas": ready, "readyReplicas": ready, "updatedReplicas": ready}})


@pytest.fixture()
def endpoints():
    server, activator = MetricsEndpoint(server_metrics(5)), MetricsEndpoint(
        "# TYPE genserve_activator_requests_waiting gauge\ngenserve_activator_requests_waiting 0\n")
    yield server, activator
    for ep in (server, activator):
        ep.stop()


def test_idle_service_scales_to_zero_and_a_held_request_wakes_it(operator, api, cluster, namespace, endpoints):
    server, activator = endpoints
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tgs_body(
        "chat", {"model": {"id": "m"}, "shards": 0, "autoscaling": {
            "enabled": True, "minReplicas": 0, "maxReplicas": 2, "intervalSeconds": 1,
            "scaleToZeroAfterSeconds": IDLE_SECONDS}}))
    wait_for(lambda: cluster.get("apps/v1/deployments", namespace, "chat-activator"), what="the activator")
    assert cluster.get("v1/services", namespace, "chat-direct")["spec"]["selector"] == {"genserve.dev/service": "chat"}
    assert replicas(cluster, namespace) == 1  # created warm
    # no server pod ready yet: requests go to the activator, which holds them until one is
    assert service_selector(cluster, namespace) == {"genserve.dev/activator": "chat"}

    add_ready_pod(api, namespace, "chat", "chat-0", server.port)
    set_deployment_status(api, namespace, ready=1)
    wait_for(lambda: service_selector(cluster, namespace) == {"genserve.dev/service": "chat"},
             what="the Service on the server pods")

    # a request in flight keeps it up past the idle window
    server.text = server_metrics(6, running=1)
    wait_for(lambda: tgs_status(api, namespace).get("runningRequests") == 1, timeout=300, what="a busy scrape")  # a loaded machine missed 120 s
    server.text = server_metrics(6)
    # then quiet: after scaleToZeroAfterSeconds the autoscaler takes it to zero
    wait_for(lambda: replicas(cluster, namespace) == 0, what="scale to zero")
    decision = tgs_status(api, namespace)["lastScaleDecision"]
    assert decision["reason"] == "ScaleToZero" and decision["toReplicas"] == 0
    # the Service moves while the last pod is still ready (it is deleted only below); a generous cap, as
    # a loaded machine can stretch the operator's tick
    wait_for(lambda: service_selector(cluster, namespace) == {"genserve.dev/activator": "chat"},
             what="the Service on the activator right after scaling to zero")
    core = client.CoreV1Api(api)
    core.delete_namespaced_pod("chat-0", namespace)
    set_deployment_status(api, namespace, ready=0)
    wait_for(lambda: service_selector(cluster, namespace) == {"genserve.dev/activator": "chat"},
             what="the Service on the activator")
    ready = wait_for(lambda: next((c for c in tgs_status(api, namespace).get("conditions", [])
                                   if c["type"] == "Ready" and c["reason"] == "ScaledToZero"), None),
                     what="Ready=ScaledToZero")
    assert ready["status"] == "True"

    # the activator's pod (the test plays it) holds a request: one replica comes back
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "chat-activator-0", "labels": {"genserve.dev/activator": "chat"}},
        "spec": {"containers": [{"name": "activator", "image": "x",
                                 "ports": [{"name": "metrics", "containerPort": activator.port}]}]}})
    core.patch_namespaced_pod_status("chat-activator-0", namespace, {"status": {
        "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}})
    activator.text = activator.text.replace("waiting 0", "waiting 2")
    wait_for(lambda: replicas(cluster, namespace) == 1, what="the wake-up")
    assert tgs_status(api, namespace)["lastScaleDecision"]["reason"] == "WakeUp"
    add_ready_pod(api, namespace, "chat", "chat-1", server.port)
    set_deployment_status(api, namespace, ready=1)
    wait_for(lambda: service_selector(cluster, namespace) == {"genserve.dev/service": "chat"},
             what="the Service back on the server pods")


def test_turning_scale_to_zero_off_removes_the_activator(operator, api, cluster, namespace):
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tgs_body(
        "chat", {"model": {"id": "m"}, "shards": 0, "autoscaling": {"enabled": True, "minReplicas": 0}}))
    wait_for(lambda: cluster.get("apps/v1/deployments", namespace, "chat-activator"), what="the activator")
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chat",
                                          {"spec": {"autoscaling": {"minReplicas": 1}}})
    wait_for(lambda: cluster.get("apps/v1/deployments", namespace, "chat-activator") is None,
             what="the activator removed")
    wait_for(lambda: cluster.get("v1/services", namespace, "chat-direct") is None, what="chat-direct removed")
    assert service_selector(cluster, namespace) == {"genserve.dev/service": "chat"}
    # kopf posts events in the background: wait for the two "Deleted" ones, then look for a "Restoring"
    wait_for(lambda: len([e for e in cluster.list("v1/events", namespace) if e.get("reason") == "Deleted"]) >= 2,
             what="the Deleted events")
    time.sleep(1)
    # removing what is no longer wanted is not a loss to restore (no "Restoring" warning)
    assert not [e for e in cluster.list("v1/events", namespace) if e.get("reason") == "Restoring"]
    assert cluster.get("apps/v1/deployments", namespace, "chat-activator") is None
