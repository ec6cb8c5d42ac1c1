"""Model caches, pure builders: the cache volume of each pod, the shared claim, and the Job that fills it.

  perPod                 every replica has its own volume (generic ephemeral or sized emptyDir), filled by
                         its init step; replicas never share a disk, so they scale across nodes.
  shared, RWX/ROX        one claim, filled once by a Job before the Deployment exists, mounted read-only.
  shared, RWO/RWOP       one claim on one node (only with at most one replica, see spec.py): filled by the
                         init step as before, and the Deployment recreates its pod instead of surging.
"""

from __future__ import annotations

import hashlib
from typing import Any

from genserve.operator.model_source import PVC_MOUNT, source_env
from genserve.operator.settings import FIELD_MANAGER, SERVICE_LABEL
from genserve.operator.spec import SINGLE_NODE_ACCESS_MODES, ServiceSpec

CACHE_MOUNT = "/data"
FILL_COMPONENT = "model-fill"


def claim_name(name: str, spec: ServiceSpec) -> str | None:
    if not spec.cache.is_shared:
        return None
    return spec.cache.existing_claim or f"{name}-model-cache"


def is_single_node_claim(spec: ServiceSpec) -> bool:
    return spec.cache.is_shared and spec.cache.access_mode in SINGLE_NODE_ACCESS_MODES


def uses_fill_job(spec: ServiceSpec) -> bool:
    needs_download = spec.model.needs_download or any(a.needs_download for a in spec.adapters)
    return spec.cache.is_shared and not is_single_node_claim(spec) and needs_download


def is_read_only(spec: ServiceSpec) -> bool:
    """Whether the server pods mount the cache read-only (a claim filled by the Job)."""
    return spec.cache.is_shared and not is_single_node_claim(spec)


def cache_env(spec: ServiceSpec, for_server: bool) -> list[dict[str, Any]]:
    """Where the libraries read and write. A read-only cache keeps every writable path under /tmp."""
    read_only = for_server and is_read_only(spec)
    writable = "/tmp" if read_only else CACHE_MOUNT
    env = [
        {"name": "HF_HOME", "value": f"{writable}/hf" if read_only else CACHE_MOUNT},
        {"name": "HF_HUB_CACHE", "value": f"{CACHE_MOUNT}/hub"},
        {"name": "HUGGINGFACE_HUB_CACHE", "value": f"{CACHE_MOUNT}/hub"},
        {"name": "GENSERVE_CACHE", "value": f"{writable}/genserve"},
        {"name": "GENSERVE_MODELS_DIR", "value": f"{CACHE_MOUNT}/models"},
        {"name": "HOME", "value": "/tmp"},
    ]
    if for_server and spec.model.needs_download:
        # the init step or the fill Job has downloaded the files: the server reads them without the Hub
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    if spec.model.token_secret:
        ref = spec.model.token_secret
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def cache_volume(name: str, spec: ServiceSpec) -> dict[str, Any]:
    cache = spec.cache
    claim = claim_name(name, spec)
    if claim:
        return {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim,
                                                                  **({"readOnly": True} if is_read_only(spec) else {})}}
    if cache.volume == "emptyDir":
        return {"name": "model-cache", "emptyDir": {"sizeLimit": cache.size}}
    claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": cache.size}}}
    if cache.storage_class_name:
        claim_spec["storageClassName"] = cache.storage_class_name
    # one claim per pod, created and deleted with it by Kubernetes (generic ephemeral volume)
    return {"name": "model-cache", "ephemeral": {"volumeClaimTemplate": {
        "metadata": {"labels": {"app.kubernetes.io/name": "genserve", "app.kubernetes.io/instance": name}},
        "spec": claim_spec}}}


def source_volumes(spec: ServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A pvc:// source: its claim, read-only, where the server's --model-id points."""
    if spec.model.pvc is None:
        return [], []
    volume = {"name": "model-source", "persistentVolumeClaim": {"claimName": spec.model.pvc.claim, "readOnly": True}}
    return [volume], [{"name": "model-source", "mountPath": PVC_MOUNT, "readOnly": True}]


def cache_mount(spec: ServiceSpec, for_server: bool) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": "model-cache", "mountPath": CACHE_MOUNT}
    if for_server and is_read_only(spec):
        mount["readOnly"] = True
    return mount


def download_container(spec: ServiceSpec, security: dict[str, Any]) -> dict[str, Any]:
    """The init step: `genserve download` into the cache (huggingface_hub for hf, boto3 for s3)."""
    return {
        "name": "download",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["genserve"],
        "args": ["download", "--model-id", spec.model.id, "--revision", spec.model.revision],
        "env": cache_env(spec, for_server=False) + [e for e in source_env(spec.model) if e["name"] != "HF_TOKEN"],
        "volumeMounts": [cache_mount(spec, for_server=False), {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": security,
    }


def build_cache_pvc(name: str, namespace: str, spec: ServiceSpec, labels: dict[str, str]) -> dict[str, Any]:
    cache = spec.cache
    pvc_spec: dict[str, Any] = {"accessModes": [cache.access_mode], "resources": {"requests": {"storage": cache.size}}}
    if cache.storage_class_name:
        pvc_spec["storageClassName"] = cache.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{name}-model-cache", "namespace": namespace, "labels": labels}, "spec": pvc_spec}


def fill_job_name(name: str, spec: ServiceSpec) -> str:
    # a Job's pod template is immutable: a new model or claim is a new Job
    key = "\0".join((spec.model.id, spec.model.revision, claim_name(name, spec) or "", spec.image,
                     *(f"{a.name}={a.source}" for a in spec.adapters if a.needs_download)))
    return f"{name}-fill-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def fill_job_selector(name: str) -> dict[str, str]:
    return {SERVICE_LABEL: name, "app.kubernetes.io/component": FILL_COMPONENT}


def build_fill_job(name: str, namespace: str, spec: ServiceSpec, labels: dict[str, str],
                   pod_security: dict[str, Any], container_security: dict[str, Any],
                   adapter_containers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    pod_labels = {"app.kubernetes.io/name": "genserve", "app.kubernetes.io/instance": name,
                  "app.kubernetes.io/component": FILL_COMPONENT, "app.kubernetes.io/managed-by": FIELD_MANAGER}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": ([download_container(spec, container_security)] if spec.model.needs_download else [])
        + list(adapter_containers or []),
        "volumes": [cache_volume(name, spec) | {"persistentVolumeClaim": {"claimName": claim_name(name, spec)}},
                    {"name": "tmp", "emptyDir": {}}],
        "securityContext": pod_security,
        "enableServiceLinks": False,
    }
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": fill_job_name(name, spec), "namespace": namespace,
                     "labels": {**labels, "app.kubernetes.io/component": FILL_COMPONENT}},
        "spec": {"backoffLimit": 3, "activeDeadlineSeconds": spec.server.startup_timeout_seconds,
                 "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec}},
    }


def job_phase(job: dict[str, Any] | None) -> str:
    """Pending (no Job yet), Filling, Filled or Failed."""
    if job is None:
        return "Pending"
    st = job.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in st.get("conditions") or []}
    if conditions.get("Complete") == "True" or (st.get("succeeded") or 0) >= 1:
        return "Filled"
    if conditions.get("Failed") == "True":
        return "Failed"
    return "Filling"
