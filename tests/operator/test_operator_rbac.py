"""Least privilege, checked: the chart's RBAC (rendered with the real Helm library) grants every API call the
operator makes and nothing else, and the real operator, driven down every reconcile path, makes exactly the
calls operator_api_calls.py lists (see there why the list is checked in)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from harness import (
    MetricsEndpoint,
    add_ready_pod,
    call_scopes,
    recorded_calls,
    tgs_body,
    tgs_status,
    wait_for,
)
from kmock import ResourceInfo
from kubernetes import client
from operator_api_calls import (
    CALLS,
    CLUSTER,
    CLUSTER_PEERING_CALLS,
    INFERENCE_GROUPS,
    NAMESPACED_MODE_CALLS,
    NAMESPACED_PEERING_CALLS,
    NS,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from delivery.support import find, render_objects  # noqa: E402  (the chart tests' renderer)

GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
WATCH = {"watchNamespaces": ["team-a", "team-b"]}
PEERING = {"operator": {"peering": "genserve"}}
# chart values -> the calls the operator makes when the chart runs it so
MODES = {
    "all-namespaces": ({}, CALLS),
    "all-namespaces-peering": (PEERING, CALLS | CLUSTER_PEERING_CALLS),
    "watch-namespaces": (WATCH, NAMESPACED_MODE_CALLS),
    "watch-namespaces-peering": ({**WATCH, **PEERING}, NAMESPACED_MODE_CALLS | NAMESPACED_PEERING_CALLS),
    # the opt-out: services asking for an InferencePool are Degraded (forbidden), nothing else changes
    "no-inference-extension": ({"rbac": {"create": True, "inferenceExtension": False}},
                               {c for c in CALLS if c[1] not in INFERENCE_GROUPS}),
}


def grants(role: dict) -> set[tuple[str, str, str]]:
    return {(verb, group, resource) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


@pytest.mark.parametrize("mode", MODES)
def test_chart_rbac_grants_exactly_the_operator_calls(mode):
    values, calls = MODES[mode]
    objects = render_objects(values)
    (cluster_role,) = find(objects, "ClusterRole")
    cluster_grants = grants(cluster_role)
    roles = find(objects, "Role")
    if values.get("watchNamespaces"):
        # namespaced calls in a Role per watched namespace, cluster-scoped ones in the ClusterRole
        assert sorted(r["metadata"]["namespace"] for r in roles) == values["watchNamespaces"]
        for role in roles:
            assert grants(role) == {c[:3] for c in calls if c[3] == NS}, role["metadata"]["namespace"]
        assert cluster_grants == {c[:3] for c in calls if c[3] == CLUSTER}
    else:
        assert not roles
        assert cluster_grants == {c[:3] for c in calls}
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] or "*" in rule["apiGroups"]
                   for role in [cluster_role, *roles] for rule in role["rules"])


def test_every_reconcile_path_is_listed(operator, api, cluster, namespace):
    """One service down every path: every optional child created, then dropped (deletes), a shared cache
    and its fill Job, the activator, an API-key Secret, the autoscaler's scrape, children restored by hand,
    and the delete with kopf's finalizer. Afterwards the calls recorded from the session's operator equal
    the list (the session-end check in conftest then covers the tests that run after this one)."""
    crds = {"monitoring.coreos.com/v1/servicemonitors": "ServiceMonitor",
            "monitoring.coreos.com/v1/podmonitors": "PodMonitor",
            "inference.networking.k8s.io/v1/inferencepools": "InferencePool",
            "gateway.networking.k8s.io/v1/httproutes": "HTTPRoute"}
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    for key, kind in crds.items():
        cluster.call(lambda c, k=key, i=ResourceInfo(kind=kind, namespaced=True, verbs=verbs):
                     c.resources.__setitem__(k, i))
    objects = client.CustomObjectsApi(api)
    endpoint = MetricsEndpoint()
    endpoint.set(waiting=0, running=1)
    try:
        client.CoreV1Api(api).create_namespaced_secret(namespace, {"metadata": {"name": "key"},
                                                                   "stringData": {"key": "x"}})
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tgs_body("all", {
            "model": {"id": "org/m"}, "shards": 0, "apiKeySecretRef": {"name": "key", "key": "key"},
            "cache": {"mode": "shared", "accessMode": "ReadWriteMany"},
            "ingress": {"enabled": True, "host": "all.example.com"}, "monitoring": {"kind": "PodMonitor"},
            "routing": {"inferencePool": {"enabled": True, "gatewayRef": {"name": "gw"}}},
            "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 3, "intervalSeconds": 1}}))
        job = wait_for(lambda: next(iter(cluster.list("batch/v1/jobs", namespace)), None), what="the fill Job")
        client.BatchV1Api(api).patch_namespaced_job_status(job["metadata"]["name"], namespace, {
            "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
        for key in (*crds, "apps/v1/deployments", "networking.k8s.io/v1/ingresses"):
            if key.endswith("servicemonitors"):
                continue  # the PodMonitor first; the ServiceMonitor replaces it below
            wait_for(lambda k=key: cluster.get(k, namespace, "all"), what=key)
        wait_for(lambda: cluster.get("apps/v1/deployments", namespace, "all-activator"), what="the activator")
        add_ready_pod(api, namespace, "all", "all-0", endpoint.port)
        wait_for(lambda: tgs_status(api, namespace, "all").get("runningRequests") == 1, what="a scrape")
        objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "all", {
            "spec": {"monitoring": {"kind": "ServiceMonitor"}}})
        monitors = [k for k in crds if k.startswith("monitoring")]
        wait_for(lambda: cluster.get(monitors[0], namespace, "all") and not cluster.get(monitors[1], namespace, "all"),
                 what="the PodMonitor replaced by a ServiceMonitor")
        client.CoreV1Api(api).delete_namespaced_service("all", namespace)
        wait_for(lambda: cluster.get("v1/services", namespace, "all"), what="the Service restored")
        # every optional child dropped: deletes of each kind, the stale fill Job and the claim
        objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "all", {"spec": {
            "model": {"id": "org/other"}, "cache": {"mode": "perPod"}, "ingress": {"enabled": False},
            "monitoring": {"enabled": False}, "routing": {"inferencePool": {"enabled": False}},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 1}}})
        gone = [(k, "all") for k in (*crds, "networking.k8s.io/v1/ingresses", "policy/v1/poddisruptionbudgets")] + [
            ("v1/persistentvolumeclaims", "all-model-cache"), ("apps/v1/deployments", "all-activator"),
            ("v1/services", "all-direct")]
        wait_for(lambda: all(cluster.get(k, namespace, n) is None for k, n in gone)
                 and not cluster.list("batch/v1/jobs", namespace), what="every optional child removed")
        objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "all")
        wait_for(lambda: cluster.get(f"{GROUP}/{VERSION}/{PLURAL}", namespace, "all") is None, what="deleted")
    finally:
        endpoint.stop()
        for key in crds:
            cluster.call(lambda c, k=key: c.resources.__delitem__(k))
    recorded = call_scopes(recorded_calls([cluster]))
    assert recorded - CALLS == set(), "calls the list lacks (add them to operator_api_calls.py and the chart)"
    assert CALLS - recorded == set(), "listed calls the operator never made (drop them from the list and chart)"

