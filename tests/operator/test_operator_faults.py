"""Reliability of the real operator against the emulator: API errors injected for a while are retried with
backoff and end converged, children changed by hand come back, an invalid spec is reported once and not
retried in a loop. (The operator killed mid-reconcile: test_operator_restart.py.)"""

from __future__ import annotations

import time

from harness import Fault, matches, tgs_body, tgs_status, wait_for
from kubernetes import client

GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
DEPLOY, SVC, PDB, ING = ("apps/v1/deployments", "v1/services", "policy/v1/poddisruptionbudgets",
                         "networking.k8s.io/v1/ingresses")
SPEC = {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "shards": 0, "replicas": 2,
        "ingress": {"enabled": True, "host": "chat.example.com"}}
CHILDREN = (DEPLOY, SVC, PDB, ING)
# the operator's first retry waits this long, each next one twice as long (controller.retry_delay)
FIRST_RETRY_SECONDS = 0.5


def create(api, namespace: str, name: str = "chat", spec: dict | None = None) -> dict:
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, tgs_body(name, spec or SPEC))


def condition(api, namespace: str, type_: str, name: str = "chat") -> dict | None:
    return next((c for c in tgs_status(api, namespace, name).get("conditions", []) if c["type"] == type_), None)


def converged(api, cluster, namespace: str) -> bool:
    degraded = condition(api, namespace, "Degraded")
    return bool(degraded and degraded["status"] == "False" and all(cluster.get(r, namespace, "chat")
                                                                  for r in CHILDREN))


def desired_state(obj: dict) -> dict:
    """What the operator sets on a child: everything but the server-managed metadata and the status."""
    return {"labels": obj["metadata"].get("labels"), "annotations": obj["metadata"].get("annotations"),
            **{k: v for k, v in obj.items() if k not in ("metadata", "status")}}


def children_state(cluster, namespace: str) -> dict:
    return {r: desired_state(cluster.get(r, namespace, "chat")) for r in CHILDREN}


def delete_tgs(api, namespace: str) -> None:
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chat")


def test_api_errors_are_retried_with_backoff_and_end_converged(operator, api, cluster, namespace):
    reference = f"{namespace}-ref"  # the same spec reconciled without faults
    create(api, reference)
    wait_for(lambda: converged(api, cluster, reference), what="the reference service")
    # each fault fails one whole reconcile pass, in this order; the pass after the last one converges
    in_order = cluster.inject(
        Fault(matches("PATCH", "services", "chat", namespace), status=409, reason="Conflict"),
        Fault(matches("PATCH", "services", "chat", namespace), status=500, reason="InternalError"),
        Fault(matches("PATCH", "poddisruptionbudgets", "chat", namespace), status=0),  # connection dropped
        Fault(matches("PATCH", "textgenerationservices", "chat", namespace, "status"), status=504,
              reason="Timeout"),
    )
    # kopf's own write (its finalizer) fails too: kopf retries its requests itself
    (kopf_write,) = cluster.inject(Fault(matches("PATCH", "textgenerationservices", "chat", namespace),
                                         status=503, reason="ServiceUnavailable"))
    try:
        create(api, namespace)
        wait_for(lambda: converged(api, cluster, namespace), what="convergence after the faults")
        assert children_state(cluster, namespace) == children_state(cluster, reference)
    finally:
        cluster.clear_faults()
        delete_tgs(api, reference)
    assert all(f.spent for f in (*in_order, kopf_write)), [len(f.hits) for f in in_order]
    hits = [f.hits[0] for f in in_order]
    gaps = [b - a for a, b in zip(hits, hits[1:], strict=False)]
    # backoff: every retry waited at least its (doubling) delay; lower bounds only, the machine may be slow
    for i, gap in enumerate(gaps):
        assert gap >= FIRST_RETRY_SECONDS * 2 ** i * 0.9, gaps
    assert cluster.get(DEPLOY, namespace, "chat")["spec"]["replicas"] == 2


def test_children_edited_or_deleted_by_hand_are_restored(operator, api, cluster, namespace):
    create(api, namespace)
    wait_for(lambda: converged(api, cluster, namespace), what="the service")
    wanted = children_state(cluster, namespace)
    core, policy, net = client.CoreV1Api(api), client.PolicyV1Api(api), client.NetworkingV1Api(api)
    # (a Deployment edited or deleted by hand: test_operator_lifecycle.py)
    edits = {
        # an extra selector key is no drift of a field we set, yet the Service would select no pod
        SVC: lambda: core.patch_namespaced_service("chat", namespace, {"spec": {"selector": {"app": "other"}}}),
        PDB: lambda: policy.patch_namespaced_pod_disruption_budget("chat", namespace, {"spec": {"maxUnavailable": 2}}),
        ING: lambda: net.patch_namespaced_ingress("chat", namespace, {"spec": {"rules": [{"host": "x.example.com"}]}}),
    }
    for resource, edit in edits.items():
        edit()
        wait_for(lambda r=resource: desired_state(cluster.get(r, namespace, "chat")) == wanted[r],
                 what=f"{resource} restored after an edit")
    deletes = {SVC: lambda: core.delete_namespaced_service("chat", namespace),
               PDB: lambda: policy.delete_namespaced_pod_disruption_budget("chat", namespace),
               ING: lambda: net.delete_namespaced_ingress("chat", namespace)}
    for resource, delete in deletes.items():
        uid = cluster.get(resource, namespace, "chat")["metadata"]["uid"]
        delete()
        wait_for(lambda r=resource, u=uid: (o := cluster.get(r, namespace, "chat")) and o["metadata"]["uid"] != u
                 and desired_state(o) == wanted[r], what=f"{resource} recreated after a delete")


def test_invalid_spec_is_degraded_once_without_a_retry_storm(operator, api, cluster, namespace):
    create(api, namespace)
    wait_for(lambda: converged(api, cluster, namespace), what="the service")
    before = {r: cluster.get(r, namespace, "chat")["metadata"]["resourceVersion"] for r in CHILDREN}
    client.CustomObjectsApi(api).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chat", {
        "spec": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}})
    degraded = wait_for(lambda: (c := condition(api, namespace, "Degraded")) and c["status"] == "True" and c,
                        what="Degraded")
    assert degraded["reason"] == "InvalidReplicaBounds" and "minReplicas" in degraded["message"]
    # let kopf finish with the failed handler (it records the outcome on the object), then watch a window
    time.sleep(1.0)
    start, window = len(cluster.cluster._requests), 4.0
    time.sleep(window)
    requests = [r for r in cluster.operator_requests() if r.id >= start and r.namespace == namespace]
    writes = [r for r in requests if r.method.value != "GET"]
    # a retry storm would show here as a write every backoff; one stray status refresh is allowed
    assert len(writes) <= 1 and len(requests) <= 4, [(r.method.value, str(r.url.path)) for r in requests]
    # the children are kept as they were: an invalid edit never tears a running service down
    assert {r: cluster.get(r, namespace, "chat")["metadata"]["resourceVersion"] for r in CHILDREN} == before
    assert len([e for e in cluster.list("v1/events", namespace) if e.get("reason") == "InvalidReplicaBounds"]) == 1


def test_an_api_the_operator_may_not_read_does_not_stop_the_reconcile(operator, api, cluster, namespace):
    """The chart's rbac.inferenceExtension off, on a cluster that serves the Gateway API: reading an
    InferencePool or HTTPRoute (to remove one no longer wanted) is forbidden; the rest still converges."""
    forbidden = cluster.inject(*(Fault(matches("GET", plural, namespace=namespace), status=403, count=10 ** 6,
                                       reason="Forbidden") for plural in ("inferencepools", "httproutes")))
    try:
        create(api, namespace)
        wait_for(lambda: converged(api, cluster, namespace), what="convergence without the Gateway API grants")
    finally:
        cluster.clear_faults()
    assert all(f.hits for f in forbidden)
