"""The real operator against the emulated API server, driven with the official kubernetes client."""

from __future__ import annotations

import kubernetes_validate
import pytest
from harness import condition, get_tgs, wait_for
from harness import create_tgs as create
from kmock import ResourceInfo
from kubernetes import client

GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
DEPLOY, SVC, PDB, PVC = "apps/v1/deployments", "v1/services", "policy/v1/poddisruptionbudgets", \
    "v1/persistentvolumeclaims"


def server_container(deployment):
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server")


@pytest.fixture()
def service(operator, api, cluster, namespace):
    created = create(api, namespace, "llama", {"model": {"id": "meta-llama/Llama-3.1-8B-Instruct"}, "shards": 2,
                                              "replicas": 2})
    for resource, name in ((DEPLOY, "llama"), (SVC, "llama"), (PDB, "llama")):
        wait_for(lambda r=resource, n=name: cluster.get(r, namespace, n), what=resource)
    return created


def test_create_builds_children_with_gpus_probes_volumes_owners_and_status(service, api, cluster, namespace):
    deployment = cluster.get(DEPLOY, namespace, "llama")
    server = server_container(deployment)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "livenessProbe" in server
    assert "--model-id" in server["args"] and "meta-llama/Llama-3.1-8B-Instruct" in server["args"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # the default perPod cache: a claim per pod from a template, no claim shared by the replicas
    assert volumes["model-cache"]["ephemeral"]["volumeClaimTemplate"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert cluster.get(PVC, namespace, "llama-model-cache") is None
    assert deployment["spec"]["replicas"] == 2
    uid = service["metadata"]["uid"]
    for resource in (DEPLOY, SVC, PDB):
        child = wait_for(lambda r=resource: cluster.get(r, namespace, "llama"), what=resource)
        assert [r["uid"] for r in child["metadata"]["ownerReferences"]] == [uid]
        assert child["metadata"]["labels"]["genserve.dev/service"] == "llama"
        stored = {k: v for k, v in child.items() if k != "status"}
        stored["metadata"] = {k: child["metadata"][k] for k in ("name", "namespace", "labels")}
        kubernetes_validate.validate(stored, "1.29.0", strict=True)
    tgs = wait_for(lambda: (o := get_tgs(api, namespace, "llama")) and condition(o, "Ready") and o,
                   what="status conditions")
    assert condition(tgs, "Ready")["status"] == "False"  # no pod is ready in the emulator yet
    assert condition(tgs, "Progressing")["status"] == "True"
    assert condition(tgs, "Degraded")["status"] == "False"
    assert tgs["status"]["endpoint"] == f"http://llama.{namespace}.svc.cluster.local/v1"
    assert tgs["status"]["observedGeneration"] == 1
    assert tgs["status"]["selector"] == "genserve.dev/service=llama"


def test_ready_condition_follows_the_deployment(service, api, cluster, namespace):
    client.AppsV1Api(api).patch_namespaced_deployment_status(
        "llama", namespace, {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}})
    tgs = wait_for(lambda: (o := get_tgs(api, namespace, "llama")) and condition(o, "Ready")
                   and condition(o, "Ready")["status"] == "True" and o, what="Ready=True")
    assert tgs["status"]["readyReplicas"] == 2
    assert condition(tgs, "Progressing")["reason"] == "RolloutComplete"


def test_update_model_and_shards_updates_the_deployment(service, api, cluster, namespace):
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "llama", {"spec": {"model": {"id": "Qwen/Qwen2.5-7B-Instruct"},
                                                             "shards": 4}})
    deployment = wait_for(lambda: (d := cluster.get(DEPLOY, namespace, "llama"))
                          and "Qwen/Qwen2.5-7B-Instruct" in server_container(d)["args"] and d,
                          what="the updated Deployment")
    server = server_container(deployment)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert server["args"][server["args"].index("--num-shard") + 1] == "4"
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][:3] == ["download", "--model-id", "Qwen/Qwen2.5-7B-Instruct"]
    wait_for(lambda: get_tgs(api, namespace, "llama")["status"].get("observedGeneration") == 2,
             what="observedGeneration 2")


def test_deleted_deployment_is_recreated(service, api, cluster, namespace):
    old_uid = cluster.get(DEPLOY, namespace, "llama")["metadata"]["uid"]
    client.AppsV1Api(api).delete_namespaced_deployment("llama", namespace)
    recreated = wait_for(lambda: (d := cluster.get(DEPLOY, namespace, "llama")) and
                         d["metadata"]["uid"] != old_uid and d, what="a recreated Deployment")
    assert server_container(recreated)["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_hand_edited_deployment_is_restored(service, api, cluster, namespace):
    client.AppsV1Api(api).patch_namespaced_deployment(
        "llama", namespace, {"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 1}}}})
    restored = wait_for(lambda: (d := cluster.get(DEPLOY, namespace, "llama"))
                        and d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 1 and d,
                        what="the restored Deployment")
    assert restored["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90 + 10 + 5
    wait_for(lambda: any(e.get("reason") == "Restored" and e["type"] == "Warning"
                         for e in cluster.list("v1/events", namespace)), what="a Restored event")


def test_deleted_service_is_recreated(service, api, cluster, namespace):
    old_uid = cluster.get(SVC, namespace, "llama")["metadata"]["uid"]
    client.CoreV1Api(api).delete_namespaced_service("llama", namespace)
    wait_for(lambda: (s := cluster.get(SVC, namespace, "llama")) and s["metadata"]["uid"] != old_uid,
             what="a recreated Service")


def test_delete_cr_removes_children(service, api, cluster, namespace):
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "llama")
    wait_for(lambda: cluster.get(f"{GROUP}/{VERSION}/{PLURAL}", namespace, "llama") is None, what="CR gone")
    for resource in (DEPLOY, SVC, PDB):
        wait_for(lambda r=resource: cluster.get(r, namespace, "llama") is None, what=f"{resource} gone")
    assert cluster.get(PVC, namespace, "llama-model-cache") is None


def test_single_replica_has_no_pdb_and_scaling_down_removes_it(service, api, cluster, namespace):
    wait_for(lambda: cluster.get(PDB, namespace, "llama"), what="the PDB")
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "llama", {"spec": {"replicas": 1}})
    wait_for(lambda: cluster.get(PDB, namespace, "llama") is None, what="PDB removed")
    assert cluster.get(DEPLOY, namespace, "llama")["spec"]["replicas"] == 1


@pytest.mark.parametrize(("spec", "reason"), [
    ({"model": {"id": "m"}, "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "InvalidReplicaBounds"),
    ({"model": {"source": "ftp://host/m"}}, "UnsupportedModelSource"),
    ({"shards": 1}, "MissingModel"),
])
def test_invalid_spec_is_degraded_with_a_reason(operator, api, cluster, namespace, spec, reason):
    create(api, namespace, "bad", spec)
    tgs = wait_for(lambda: (o := get_tgs(api, namespace, "bad")) and condition(o, "Degraded") and o,
                   what="Degraded")
    degraded = condition(tgs, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == reason
    assert condition(tgs, "Ready")["status"] == "False"
    assert cluster.get(DEPLOY, namespace, "bad") is None
    wait_for(lambda: any(e.get("reason") == reason for e in cluster.list("v1/events", namespace)),
             what=f"a Warning event {reason}")


def test_fixing_an_invalid_spec_clears_degraded(operator, api, cluster, namespace):
    create(api, namespace, "fixme", {"model": {"id": "m"}, "autoscaling": {"enabled": True, "minReplicas": 5,
                                                                           "maxReplicas": 2}})
    wait_for(lambda: condition(get_tgs(api, namespace, "fixme"), "Degraded"), what="Degraded")
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "fixme", {"spec": {"autoscaling": {"minReplicas": 1}}})
    wait_for(lambda: condition(get_tgs(api, namespace, "fixme"), "Degraded")["status"] == "False",
             what="Degraded=False")
    assert cluster.get(DEPLOY, namespace, "fixme") is not None


def test_events_are_posted_for_created_children(service, cluster, namespace):
    def created() -> str:
        return " ".join(e["message"] for e in cluster.list("v1/events", namespace) if e.get("reason") == "Created")

    wait_for(lambda: "PodDisruptionBudget llama" in created(), what="the last Created event")
    messages = created()
    for child in ("Deployment llama", "Service llama", "PodDisruptionBudget llama"):
        assert child in messages
    events = [e for e in cluster.list("v1/events", namespace) if e.get("reason") == "Created"]
    assert all(e["involvedObject"]["kind"] == "TextGenerationService" for e in events)


def test_service_monitor_is_created_when_its_crd_exists(operator, api, cluster, namespace):
    key = "monitoring.coreos.com/v1/servicemonitors"
    info = ResourceInfo(kind="ServiceMonitor", namespaced=True, verbs={"get", "list", "watch", "create", "patch",
                                                                       "delete"})
    cluster.call(lambda c: c.resources.__setitem__(key, info))
    try:
        create(api, namespace, "watched", {"model": {"id": "m"}, "shards": 0})
        monitor = wait_for(lambda: cluster.get(key, namespace, "watched"), what="the ServiceMonitor")
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert monitor["spec"]["selector"]["matchLabels"] == {"genserve.dev/service": "watched",
                                                              "app.kubernetes.io/component": "server"}
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "watched", {"spec": {"monitoring": {"enabled": False}}})
        wait_for(lambda: cluster.get(key, namespace, "watched") is None, what="the ServiceMonitor removed")
    finally:
        cluster.call(lambda c: c.resources.__delitem__(key))


def test_pod_monitor_per_service_when_asked(operator, api, cluster, namespace):
    keys = {"ServiceMonitor": "monitoring.coreos.com/v1/servicemonitors",
            "PodMonitor": "monitoring.coreos.com/v1/podmonitors"}
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    for kind, key in keys.items():
        info = ResourceInfo(kind=kind, namespaced=True, verbs=verbs)
        cluster.call(lambda c, k=key, i=info: c.resources.__setitem__(k, i))
    try:
        create(api, namespace, "podmon", {"model": {"id": "m"}, "shards": 0, "monitoring": {"kind": "PodMonitor"}})
        monitor = wait_for(lambda: cluster.get(keys["PodMonitor"], namespace, "podmon"), what="the PodMonitor")
        assert monitor["spec"]["selector"]["matchLabels"]["genserve.dev/service"] == "podmon"
        assert cluster.get(keys["ServiceMonitor"], namespace, "podmon") is None
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "podmon", {"spec": {"monitoring": {"kind": "ServiceMonitor"}}})
        wait_for(lambda: cluster.get(keys["ServiceMonitor"], namespace, "podmon")
                 and cluster.get(keys["PodMonitor"], namespace, "podmon") is None,
                 what="switched to a ServiceMonitor")
        client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "podmon")
        wait_for(lambda: cluster.get(f"{GROUP}/{VERSION}/{PLURAL}", namespace, "podmon") is None,
                 what="the service gone while the monitor APIs are still served")
    finally:
        for key in keys.values():
            cluster.call(lambda c, k=key: c.resources.__delitem__(k))
