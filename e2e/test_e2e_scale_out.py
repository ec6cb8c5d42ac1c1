"""Scale-out across nodes with per-pod model caches: two replicas forced onto two nodes both become ready,
each with its own cache claim. Needs a cluster with two schedulable nodes (e2e/README.md: kind with two
workers); skips otherwise, and without a cluster like every e2e test."""

from __future__ import annotations

import copy

import pytest
import yaml

from .support import GROUP, PLURAL, ROOT, VERSION, wait_for
from .test_e2e import READY_TIMEOUT

pytestmark = pytest.mark.e2e


def _schedulable_nodes(kube) -> list[str]:
    nodes = kube.CoreV1Api().list_node().items
    return [n.metadata.name for n in nodes if not n.spec.unschedulable
            and not any(t.effect == "NoSchedule" for t in n.spec.taints or [])]


def _has_default_storage_class(kube) -> bool:
    classes = kube.StorageV1Api().list_storage_class().items
    return any((c.metadata.annotations or {}).get("storageclass.kubernetes.io/is-default-class") == "true"
               for c in classes)


def test_per_pod_caches_scale_across_two_nodes(kube, operator_release, namespace):
    nodes = _schedulable_nodes(kube)
    if len(nodes) < 2:
        pytest.skip(f"needs two schedulable nodes, found {len(nodes)} (kind: two workers, see e2e/README.md)")
    obj = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "smollm2-cpu.yaml").read_text()))
    name = obj["metadata"]["name"] = "smollm2-spread"
    volume = "ephemeral" if _has_default_storage_class(kube) else "emptyDir"
    obj["spec"].update(
        replicas=2, cache={"mode": "perPod", "volume": volume, "size": "2Gi"},
        resources={"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}},
        # one replica per node: what a ReadWriteOnce claim shared by both could never do
        affinity={"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {"genserve.dev/service": name}},
            "topologyKey": "kubernetes.io/hostname"}]}})
    custom, core = kube.CustomObjectsApi(), kube.CoreV1Api()
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)

    def two_ready():
        status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        return status if status.get("readyReplicas", 0) >= 2 else None

    wait_for(two_ready, READY_TIMEOUT, 5, "two ready replicas")
    pods = core.list_namespaced_pod(namespace, label_selector=f"genserve.dev/service={name}").items
    running = [p for p in pods if p.status.phase == "Running"]
    assert len({p.spec.node_name for p in running}) == 2
    if volume == "ephemeral":
        claims = {c.metadata.name for c in core.list_namespaced_persistent_volume_claim(namespace).items}
        assert {f"{p.metadata.name}-model-cache" for p in running} <= claims  # one claim per pod
        assert f"{name}-model-cache" not in claims
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
