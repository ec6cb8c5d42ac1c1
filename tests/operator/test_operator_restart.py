"""Level-based and idempotent: the operator, its own process as the chart runs it (with a peering object),
SIGKILLed in the middle of a reconcile pass; a new one converges to the same children as an uninterrupted
pass, and a third one started over the converged state changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import yaml
from harness import (
    OPERATOR_TOKEN,
    ClusterThread,
    Fault,
    OperatorProcess,
    call_scopes,
    matches,
    recorded_calls,
    register_resources,
    tgs_body,
    tgs_status,
    wait_for,
)
from kmock import ResourceInfo
from kubernetes import client
from operator_api_calls import CALLS, CLUSTER_PEERING_CALLS

GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
CHILDREN = ("apps/v1/deployments", "v1/services", "policy/v1/poddisruptionbudgets")
SPEC = {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "shards": 0, "replicas": 2}


def with_peering(cluster) -> None:
    register_resources(cluster)
    verbs = {"list", "watch", "get", "patch", "create", "delete"}
    cluster.resources["kopf.dev/v1/clusterkopfpeerings"] = ResourceInfo(kind="ClusterKopfPeering",
                                                                        namespaced=False, verbs=verbs)


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory) -> Iterator[tuple[ClusterThread, client.ApiClient, str, str]]:
    """An emulator of its own: the session's in-process operator must not reconcile these objects."""
    with ClusterThread(with_peering) as ct:
        folder = tmp_path_factory.mktemp("restart")
        kubeconfig = folder / "config"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "k",
            "clusters": [{"name": "k", "cluster": {"server": ct.url}}],
            "users": [{"name": "operator", "user": {"token": OPERATOR_TOKEN}}],
            "contexts": [{"name": "k", "context": {"cluster": "k", "user": "operator"}}]}))
        api = client.ApiClient(client.Configuration(host=ct.url))
        client.CustomObjectsApi(api).create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", {
            "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "genserve"}})
        yield ct, api, str(kubeconfig), str(folder / "operator.log")


def start_operator(kubeconfig: str, log: str, priority: int) -> OperatorProcess:
    # a killed operator's peering entry outlives it (60 s); a newer one with a higher priority need not
    # wait for it to expire (with equal priorities kopf pauses both until it does)
    return OperatorProcess(kubeconfig, ["--all-namespaces", "--peering=genserve", f"--priority={priority}"],
                           log).start()


def converged(ct: ClusterThread, api, namespace: str) -> bool:
    degraded = next((c for c in tgs_status(api, namespace).get("conditions", []) if c["type"] == "Degraded"), None)
    return bool(degraded and degraded["status"] == "False" and all(ct.get(r, namespace, "chat") for r in CHILDREN))


def children(ct: ClusterThread, namespace: str) -> dict:
    """What the operator sets on each child (no server-managed metadata, no status)."""
    out = {}
    for resource in CHILDREN:
        obj = ct.get(resource, namespace, "chat")
        out[resource] = {"labels": obj["metadata"].get("labels"), "owners": len(obj["metadata"]["ownerReferences"]),
                         **{k: v for k, v in obj.items() if k not in ("metadata", "status")}}
    return out


def versions(ct: ClusterThread, namespaces: tuple[str, ...]) -> dict:
    return {(ns, r): ct.get(r, ns, "chat")["metadata"]["resourceVersion"] for ns in namespaces for r in CHILDREN}


def test_killed_mid_reconcile_a_new_operator_converges_to_the_same_children(own_cluster):
    ct, api, kubeconfig, log = own_cluster
    objects = client.CustomObjectsApi(api)
    first = start_operator(kubeconfig, log, 1)
    try:
        objects.create_namespaced_custom_object(GROUP, VERSION, "reference", PLURAL, tgs_body("chat", SPEC))
        wait_for(lambda: converged(ct, api, "reference"), what="the uninterrupted reference")
        # hold the Service's apply: the Deployment is applied, the Service and the PDB are not yet
        (held,) = ct.inject(Fault(matches("PATCH", "services", "chat", "victim"), status=503, delay=120))
        objects.create_namespaced_custom_object(GROUP, VERSION, "victim", PLURAL, tgs_body("chat", SPEC))
        wait_for(lambda: held.hits, what="the reconcile pass to reach the Service")
        assert ct.get("apps/v1/deployments", "victim", "chat") is not None
        first.kill()
    finally:
        first.kill()
        ct.clear_faults()
    assert ct.get("v1/services", "victim", "chat") is None and ct.get("policy/v1/poddisruptionbudgets",
                                                                      "victim", "chat") is None
    deployment_uid = ct.get("apps/v1/deployments", "victim", "chat")["metadata"]["uid"]

    second = start_operator(kubeconfig, log, 2)
    try:
        wait_for(lambda: converged(ct, api, "victim"), what="convergence after the restart")
    finally:
        second.kill()
    assert children(ct, "victim") == children(ct, "reference")
    assert ct.get("apps/v1/deployments", "victim", "chat")["metadata"]["uid"] == deployment_uid  # not recreated

    # idempotent: an operator resuming over converged services writes no child
    before = versions(ct, ("reference", "victim"))
    start = len(ct.cluster._requests)
    third = start_operator(kubeconfig, log, 3)
    try:
        def resumed(namespace: str) -> bool:  # its resume pass read the last child of each service
            return any(r.id >= start and r.namespace == namespace and r.method.value == "GET" and r.resource
                       and r.resource.plural == "poddisruptionbudgets" for r in ct.operator_requests())
        wait_for(lambda: resumed("reference") and resumed("victim"), what="the third operator's resume passes")
        time.sleep(1.0)  # anything it would still write (status, a re-apply) lands within this
        assert versions(ct, ("reference", "victim")) == before
        writes = [r for r in ct.operator_requests() if r.id >= start and r.resource and (
            r.method.value in ("POST", "PUT", "DELETE") and r.resource.plural != "events" or r.subresource)]
        # its server-side applies were no-ops (versions unchanged); nothing created, deleted or re-statused
        assert not writes, [(r.method.value, str(r.url.path)) for r in writes]
    finally:
        third.stop()
    # these operators ran with a peering object: its calls are the chart's peering grants, no more
    recorded = call_scopes(recorded_calls([ct]))
    assert CLUSTER_PEERING_CALLS <= recorded <= CALLS | CLUSTER_PEERING_CALLS, recorded - CALLS
