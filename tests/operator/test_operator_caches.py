"""The real operator against the emulated API server: cache modes, model sources and references that are
missing. Every manifest the operator writes is checked with kubernetes-validate (strict)."""

from __future__ import annotations

import kubernetes_validate
import pytest
from harness import condition, get_tgs, wait_for
from harness import create_tgs as create
from kubernetes import client

GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
DEPLOY, PVC, JOB = "apps/v1/deployments", "v1/persistentvolumeclaims", "batch/v1/jobs"
MODEL = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}
WAIT = 120  # generous: the emulator and the operator share two busy cores


def wait_condition(api, namespace, name, type_, status, reason=None):
    def check():
        c = condition(get_tgs(api, namespace, name), type_)
        return c if c and c["status"] == status and (reason is None or c["reason"] == reason) else None
    return wait_for(check, timeout=WAIT, what=f"{type_}={status} {reason or ''}")


def validate_stored(obj):
    stored = {k: v for k, v in obj.items() if k != "status"}
    stored["metadata"] = {k: obj["metadata"][k] for k in ("name", "namespace", "labels")}
    kubernetes_validate.validate(stored, "1.29.0", strict=True)
    return obj


def pod_volume(pod_spec, name="model-cache"):
    return next(v for v in pod_spec["volumes"] if v["name"] == name)


def is_handled(api, namespace, name):
    """kopf records the handled spec once it is done with it, failed or not: no retry is pending."""
    annotations = get_tgs(api, namespace, name)["metadata"].get("annotations") or {}
    return "genserve.dev/last-handled-configuration" in annotations


def test_per_pod_replicas_each_get_their_own_volume(operator, api, cluster, namespace):
    create(api, namespace, "pp", {"model": MODEL, "shards": 0, "replicas": 3,
                                  "cache": {"mode": "perPod", "storageClassName": "local", "size": "5Gi"}})
    deployment = validate_stored(wait_for(lambda: cluster.get(DEPLOY, namespace, "pp"), timeout=WAIT, what="the Deployment"))
    pod = deployment["spec"]["template"]["spec"]
    template = pod_volume(pod)["ephemeral"]["volumeClaimTemplate"]
    # Kubernetes makes one claim per pod from this template (<pod>-model-cache); no claim is shared
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"] and template["spec"]["storageClassName"] == "local"
    assert [c["name"] for c in pod["initContainers"]] == ["download"]
    assert cluster.list(PVC, namespace) == [] and cluster.list(JOB, namespace) == []
    assert deployment["spec"]["replicas"] == 3
    cache = wait_condition(api, namespace, "pp", "CacheReady", "True", "FilledByInitStep")
    assert "per-pod volume" in cache["message"]


def test_shared_claim_is_filled_by_a_job_before_pods_then_mounted_read_only(operator, api, cluster, namespace):
    create(api, namespace, "sh", {"model": MODEL, "shards": 0, "replicas": 2,
                                  "cache": {"mode": "shared", "accessMode": "ReadWriteMany", "size": "5Gi"}})
    job = wait_for(lambda: (jobs := cluster.list(JOB, namespace)) and jobs[0], timeout=WAIT, what="the fill Job")
    validate_stored(job)
    claim = validate_stored(wait_for(lambda: cluster.get(PVC, namespace, "sh-model-cache"), timeout=WAIT, what="the claim"))
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:3] == ["download", "--model-id", MODEL["id"]]
    filling = wait_condition(api, namespace, "sh", "CacheReady", "False", "Filling")
    assert job["metadata"]["name"] in filling["message"]
    tgs = get_tgs(api, namespace, "sh")
    assert tgs["status"]["cache"]["phase"] == "Filling" and tgs["status"]["cache"]["fillJob"] == job["metadata"]["name"]
    assert condition(tgs, "Progressing")["reason"] == "Filling"
    assert cluster.get(DEPLOY, namespace, "sh") is None  # no pod starts on a half-filled claim

    client.BatchV1Api(api).patch_namespaced_job_status(job["metadata"]["name"], namespace, {"status": {
        "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
    deployment = validate_stored(wait_for(lambda: cluster.get(DEPLOY, namespace, "sh"), timeout=WAIT, what="the Deployment"))
    pod = deployment["spec"]["template"]["spec"]
    assert pod_volume(pod)["persistentVolumeClaim"] == {"claimName": "sh-model-cache", "readOnly": True}
    assert "initContainers" not in pod
    assert {"name": "model-cache", "mountPath": "/data", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    wait_condition(api, namespace, "sh", "CacheReady", "True", "Filled")
    assert get_tgs(api, namespace, "sh")["status"]["cache"]["filledJob"] == job["metadata"]["name"]


def test_failed_fill_job_is_degraded_and_no_pods_start(operator, api, cluster, namespace):
    create(api, namespace, "ff", {"model": MODEL, "shards": 0, "cache": {"mode": "shared"}})
    job = wait_for(lambda: (jobs := cluster.list(JOB, namespace)) and jobs[0], timeout=WAIT, what="the fill Job")
    client.BatchV1Api(api).patch_namespaced_job_status(job["metadata"]["name"], namespace, {"status": {
        "failed": 4, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
    degraded = wait_condition(api, namespace, "ff", "Degraded", "True", "FillFailed")
    assert job["metadata"]["name"] in degraded["message"]
    assert cluster.get(DEPLOY, namespace, "ff") is None
    assert len(cluster.list(JOB, namespace)) == 1  # the failed Job is kept for its logs, not retried


def test_a_new_model_replaces_the_fill_job(operator, api, cluster, namespace):
    create(api, namespace, "nm", {"model": {"id": "org/a"}, "shards": 0, "cache": {"mode": "shared"}})
    first = wait_for(lambda: (jobs := cluster.list(JOB, namespace)) and jobs[0]["metadata"]["name"], timeout=WAIT, what="a Job")
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "nm", {"spec": {"model": {"id": "org/b"}}})
    names = wait_for(lambda: (n := [j["metadata"]["name"] for j in cluster.list(JOB, namespace)]) and first not in n
                     and n, timeout=WAIT, what="the old Job replaced")
    assert len(names) == 1


def test_rwo_shared_claim_with_replicas_is_refused(operator, api, cluster, namespace):
    create(api, namespace, "rwo", {"model": MODEL, "shards": 0, "autoscaling": {"enabled": True, "maxReplicas": 4},
                                   "cache": {"mode": "shared", "accessMode": "ReadWriteOnce"}})
    degraded = wait_condition(api, namespace, "rwo", "Degraded", "True", "CacheNotShareable")
    assert "ReadWriteOnce" in degraded["message"] and "perPod" in degraded["message"]
    wait_for(lambda: is_handled(api, namespace, "rwo"), timeout=WAIT, what="kopf done with the spec (no retries)")
    assert cluster.get(DEPLOY, namespace, "rwo") is None and cluster.list(PVC, namespace) == []


def test_old_model_cache_spec_keeps_working_with_one_replica(operator, api, cluster, namespace):
    create(api, namespace, "old", {"model": MODEL, "shards": 0, "modelCache": {"size": "7Gi"}})
    claim = wait_for(lambda: cluster.get(PVC, namespace, "old-model-cache"), timeout=WAIT, what="the old claim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    deployment = wait_for(lambda: cluster.get(DEPLOY, namespace, "old"), timeout=WAIT, what="the Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod_volume(deployment["spec"]["template"]["spec"])["persistentVolumeClaim"] == {
        "claimName": "old-model-cache"}
    # moving to the new default drops the claim the operator made
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "old", {"spec": {"modelCache": None, "cache": {"mode": "perPod"}}})
    wait_for(lambda: cluster.get(PVC, namespace, "old-model-cache") is None, timeout=WAIT, what="the old claim deleted")


@pytest.mark.parametrize(("model", "reason", "words"), [
    ({"source": "ftp://mirror/models/m"}, "UnsupportedModelSource", "'ftp'"),
    ({"source": "s3://models/qwen", "s3": {"credentialsSecretRef": {"name": "absent"}}}, "SecretNotFound",
     "Secret absent"),
    ({"source": "pvc://no-such-claim/llama"}, "ClaimNotFound", "no-such-claim"),
    ({"id": "org/gated", "tokenSecretRef": {"name": "hf-token"}}, "SecretNotFound", "spec.model.tokenSecretRef"),
])
def test_bad_source_or_missing_reference_is_degraded(operator, api, cluster, namespace, model, reason, words):
    create(api, namespace, "bad", {"model": model, "shards": 0})
    degraded = wait_condition(api, namespace, "bad", "Degraded", "True", reason)
    assert words in degraded["message"]
    assert condition(get_tgs(api, namespace, "bad"), "Ready")["status"] == "False"
    wait_for(lambda: is_handled(api, namespace, "bad"), timeout=WAIT, what="kopf done with the spec (no retries)")
    assert cluster.get(DEPLOY, namespace, "bad") is None
    wait_for(lambda: any(e.get("reason") == reason for e in cluster.list("v1/events", namespace)), timeout=WAIT,
             what=f"a Warning event {reason}")


def test_s3_source_runs_once_its_secret_exists(operator, api, cluster, namespace):
    client.CoreV1Api(api).create_namespaced_secret(namespace, {
        "metadata": {"name": "minio"}, "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}})
    create(api, namespace, "s3", {"shards": 0, "model": {
        "source": "s3://models/qwen", "s3": {"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "minio"}}}})
    deployment = validate_stored(wait_for(lambda: cluster.get(DEPLOY, namespace, "s3"), timeout=WAIT, what="the Deployment"))
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    env = {e["name"]: e for e in init["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "minio",
                                                                          "key": "AWS_SECRET_ACCESS_KEY"}}
    assert "value" not in env["AWS_ACCESS_KEY_ID"]
    wait_condition(api, namespace, "s3", "Degraded", "False")


def test_secret_without_the_key_is_degraded(operator, api, cluster, namespace):
    client.CoreV1Api(api).create_namespaced_secret(namespace, {
        "metadata": {"name": "minio"}, "type": "Opaque", "stringData": {"user": "id"}})
    create(api, namespace, "nokey", {"shards": 0, "model": {
        "source": "s3://models/qwen", "s3": {"credentialsSecretRef": {"name": "minio"}}}})
    degraded = wait_condition(api, namespace, "nokey", "Degraded", "True", "SecretKeyNotFound")
    assert "'AWS_ACCESS_KEY_ID'" in degraded["message"]


def test_pvc_source_mounts_the_claim_once_it_exists(operator, api, cluster, namespace):
    client.CoreV1Api(api).create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": "weights"},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "20Gi"}}}})
    create(api, namespace, "local", {"shards": 0, "replicas": 2, "model": {"source": "pvc://weights/llama/8b"}})
    deployment = validate_stored(wait_for(lambda: cluster.get(DEPLOY, namespace, "local"), timeout=WAIT, what="the Deployment"))
    pod = deployment["spec"]["template"]["spec"]
    assert pod_volume(pod, "model-source")["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert "initContainers" not in pod
    cache = wait_condition(api, namespace, "local", "CacheReady", "True", "SourceMounted")
    assert "weights" in cache["message"]
