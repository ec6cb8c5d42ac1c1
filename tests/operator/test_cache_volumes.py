"""Model caches and sources, builder level: what each cache mode and source turns into, strictly valid."""

from __future__ import annotations

import kubernetes_validate
import pytest

from genserve.operator.cache_volumes import fill_job_name, job_phase
from genserve.operator.reconcile import build_children
from genserve.operator.settings import SERVICE_LABEL, OperatorSettings
from genserve.operator.spec import SpecError, parse_spec

SETTINGS = OperatorSettings()
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
MODEL = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def build(raw: dict, filled: bool = True, replicas: int = 2):
    spec = parse_spec(raw, "img")
    wanted, absent = build_children("svc", "ns", spec, SETTINGS, replicas, cache_filled=filled)
    return spec, {o["kind"]: o for o in wanted}, absent


def pod_of(objs: dict) -> dict:
    return objs["Deployment"]["spec"]["template"]["spec"]


def volume(pod: dict, name: str = "model-cache") -> dict:
    return next(v for v in pod["volumes"] if v["name"] == name)


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def validate_all(objs: dict) -> None:
    for obj in objs.values():
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_per_pod_is_the_default_and_gives_each_replica_its_own_claim():
    _, objs, absent = build({"model": MODEL, "replicas": 3, "cache": {"storageClassName": "fast", "size": "20Gi"}})
    validate_all(objs)
    pod = pod_of(objs)
    template = volume(pod)["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert template == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                        "resources": {"requests": {"storage": "20Gi"}}}
    assert "PersistentVolumeClaim" not in objs and ("PersistentVolumeClaim", "svc-model-cache") in absent
    init = pod["initContainers"][0]
    assert init["args"][:3] == ["download", "--model-id", MODEL["id"]]
    assert {"name": "model-cache", "mountPath": "/data"} in init["volumeMounts"]
    assert {"name": "model-cache", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"]
    assert objs["Deployment"]["spec"]["strategy"]["type"] == "RollingUpdate"


def test_per_pod_empty_dir_has_a_size_limit():
    _, objs, _ = build({"model": MODEL, "cache": {"mode": "perPod", "volume": "emptyDir", "size": "8Gi"}})
    validate_all(objs)
    assert volume(pod_of(objs)) == {"name": "model-cache", "emptyDir": {"sizeLimit": "8Gi"}}


def test_shared_claim_is_filled_by_a_job_before_the_deployment_exists():
    raw = {"model": MODEL, "replicas": 4, "cache": {"mode": "shared", "accessMode": "ReadWriteMany",
                                                    "storageClassName": "nfs", "size": "10Gi"}}
    spec, objs, absent = build(raw, filled=False)
    validate_all(objs)
    assert "Deployment" not in objs and all(kind != "Deployment" or name != "svc" for kind, name in absent)
    claim = objs["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "svc-model-cache" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = objs["Job"]
    assert job["metadata"]["name"] == fill_job_name("svc", spec)
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["containers"][0]["args"][0] == "download"
    assert volume(pod)["persistentVolumeClaim"] == {"claimName": "svc-model-cache"}  # written by the Job
    # the Job's pod is no server pod: the Service, the PDB and the autoscaler never select it
    assert SERVICE_LABEL not in job["spec"]["template"]["metadata"]["labels"]


def test_filled_shared_claim_is_mounted_read_only_without_an_init_step():
    _, objs, _ = build({"model": MODEL, "replicas": 4, "cache": {"mode": "shared", "accessMode": "ReadOnlyMany"}})
    validate_all(objs)
    pod = pod_of(objs)
    assert "initContainers" not in pod and "Job" not in objs
    assert volume(pod)["persistentVolumeClaim"] == {"claimName": "svc-model-cache", "readOnly": True}
    server = pod["containers"][0]
    assert {"name": "model-cache", "mountPath": "/data", "readOnly": True} in server["volumeMounts"]
    env = env_of(server)
    # nothing writes to the read-only claim: library caches and compiled kernels go to /tmp
    assert env["HF_HUB_CACHE"] == "/data/hub" and env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HOME"].startswith("/tmp/") and env["GENSERVE_CACHE"].startswith("/tmp/")


def test_single_node_shared_claim_with_one_replica_keeps_the_init_step_and_recreates():
    _, objs, _ = build({"model": MODEL, "cache": {"mode": "shared", "accessMode": "ReadWriteOnce"}}, replicas=1)
    validate_all(objs)
    pod = pod_of(objs)
    assert pod["initContainers"][0]["args"][0] == "download" and "Job" not in objs
    assert volume(pod)["persistentVolumeClaim"] == {"claimName": "svc-model-cache"}
    assert objs["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("raw", [
    {"replicas": 2, "cache": {"mode": "shared", "accessMode": "ReadWriteOnce"}},
    {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3},
     "cache": {"mode": "shared", "accessMode": "ReadWriteOncePod"}},
    {"replicas": 2, "modelCache": {"size": "10Gi"}},  # the old field's default was ReadWriteOnce
])
def test_single_node_claim_with_more_replicas_possible_is_refused(raw):
    with pytest.raises(SpecError) as err:
        parse_spec({"model": MODEL, **raw}, "img")
    assert err.value.reason == "CacheNotShareable" and "perPod" in str(err.value)


def test_old_model_cache_field_keeps_its_claim():
    spec, objs, _ = build({"model": MODEL, "modelCache": {"size": "10Gi", "storageClassName": "ssd"}}, replicas=1)
    assert spec.cache.is_legacy and spec.cache.mode == "shared"
    claim = objs["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "svc-model-cache" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["storageClassName"] == "ssd" and claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    _, objs, _ = build({"model": MODEL, "modelCache": {"existingClaim": "weights", "accessMode": "ReadWriteMany"}})
    assert "PersistentVolumeClaim" not in objs
    assert volume(pod_of(objs))["persistentVolumeClaim"]["claimName"] == "weights"


def test_a_new_model_is_a_new_fill_job():
    base = {"model": {"id": "m", "revision": "a"}, "cache": {"mode": "shared"}}
    other = {"model": {"id": "m", "revision": "b"}, "cache": {"mode": "shared"}}
    assert fill_job_name("svc", parse_spec(base, "img")) != fill_job_name("svc", parse_spec(other, "img"))
    assert fill_job_name("svc", parse_spec(base, "img")) == fill_job_name("svc", parse_spec(dict(base), "img"))


def test_job_phase():
    assert job_phase(None) == "Pending"
    assert job_phase({"status": {"active": 1}}) == "Filling"
    assert job_phase({"status": {"succeeded": 1}}) == "Filled"
    assert job_phase({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == "Filled"
    assert job_phase({"status": {"failed": 4, "conditions": [{"type": "Failed", "status": "True"}]}}) == "Failed"


# ---- sources ------------------------------------------------------------------------------------------

S3 = {"source": "s3://models/qwen/7b", "s3": {"endpoint": "http://minio:9000", "region": "eu-west-1",
                                              "credentialsSecretRef": {"name": "minio"}}}


def test_s3_source_credentials_come_only_from_the_secret():
    spec, objs, _ = build({"model": S3})
    validate_all(objs)
    pod = pod_of(objs)
    init, server = pod["initContainers"][0], pod["containers"][0]
    assert init["args"][:3] == ["download", "--model-id", "s3://models/qwen/7b"]
    env = env_of(init)
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000" and env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "minio", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "minio", "key": "AWS_SECRET_ACCESS_KEY"}}
    # the server reads the copied files; the keys stay with the download step
    assert not any(name.startswith("AWS_") for name in env_of(server))
    assert server["args"][server["args"].index("--model-id") + 1] == "s3://models/qwen/7b"
    assert [ref.name for _, ref in spec.model.secret_refs()] == ["minio", "minio"]


def test_hf_source_with_a_revision():
    spec = parse_spec({"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct@v2", "tokenSecretRef": {"name": "hf"}}},
                      "img")
    assert (spec.model.id, spec.model.revision, spec.model.scheme) == ("Qwen/Qwen2.5-0.5B-Instruct", "v2", "hf")
    assert parse_spec({"model": {"source": "hf://org/m"}}, "img").model.revision == "main"


def test_pvc_source_is_mounted_read_only_and_downloads_nothing():
    _, objs, _ = build({"model": {"source": "pvc://weights/llama/8b"}})
    validate_all(objs)
    pod = pod_of(objs)
    assert "initContainers" not in pod
    assert volume(pod, "model-source")["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    server = pod["containers"][0]
    assert {"name": "model-source", "mountPath": "/model-source", "readOnly": True} in server["volumeMounts"]
    assert server["args"][server["args"].index("--model-id") + 1] == "/model-source/llama/8b"
    assert "HF_HUB_OFFLINE" not in env_of(server)


@pytest.mark.parametrize(("model", "reason"), [
    ({"source": "ftp://mirror/m"}, "UnsupportedModelSource"),
    ({"source": "org/m"}, "UnsupportedModelSource"),
    ({"source": "s3://bucket-only"}, "InvalidModelSource"),
    ({"source": "hf://"}, "InvalidModelSource"),
    ({"source": "hf://a/b/c"}, "InvalidModelSource"),
    ({"source": "hf://org/m", "s3": {"region": "x"}}, "InvalidModelSource"),
    ({"source": "s3://b/p", "s3": {"credentialsSecretRef": {"key": "x"}}}, "InvalidSecretRef"),
    ({}, "MissingModel"),
])
def test_bad_sources_are_refused_with_a_reason(model, reason):
    with pytest.raises(SpecError) as err:
        parse_spec({"model": model}, "img")
    assert err.value.reason == reason
