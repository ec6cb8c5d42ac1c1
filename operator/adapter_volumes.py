"""Adapters in the pods, pure builders: where each adapter lives, the server's flags, the read-only claims
of pvc:// adapters, and the fetch step that runs beside the model's download (init step or fill Job).

Fetched adapters (Hub, S3) land in the cache as the model does and are linked at /data/adapters/<name>,
so the server's --lora-adapters names a fixed path whatever commit a branch resolved to.
"""

from __future__ import annotations

import json
from typing import Any

from genserve.operator.adapters import AdapterSpec
from genserve.operator.cache_volumes import CACHE_MOUNT, cache_env, cache_mount
from genserve.operator.model_source import PVC_MOUNT, s3_env
from genserve.operator.spec import ServiceSpec

FETCHED_DIR = f"{CACHE_MOUNT}/adapters"
SOURCES_MOUNT = "/adapter-sources"
FETCH_MODULE = "genserve.operator.adapter_fetch"


def _extra_claims(spec: ServiceSpec) -> list[str]:
    """Claims of pvc:// adapters that no other volume of the pod mounts already."""
    mounted = {spec.model.pvc.claim if spec.model.pvc else None,
               spec.cache.existing_claim if spec.cache.is_shared else None}
    claims: list[str] = []
    for adapter in spec.adapters:
        if adapter.pvc and adapter.pvc.claim not in mounted and adapter.pvc.claim not in claims:
            claims.append(adapter.pvc.claim)
    return claims


def adapter_path(spec: ServiceSpec, adapter: AdapterSpec) -> str:
    if adapter.pvc is None:
        return f"{FETCHED_DIR}/{adapter.name}"
    pvc = adapter.pvc
    if spec.model.pvc and pvc.claim == spec.model.pvc.claim:
        root = PVC_MOUNT
    elif spec.cache.is_shared and pvc.claim == spec.cache.existing_claim:
        root = CACHE_MOUNT
    else:
        root = f"{SOURCES_MOUNT}/{pvc.claim}"
    return f"{root}/{pvc.path}".rstrip("/")


def server_flags(spec: ServiceSpec) -> list[str]:
    """TGI's --lora-adapters name=path,... and --max-loras."""
    flags = []
    if spec.adapters:
        flags += ["--lora-adapters", ",".join(f"{a.name}={adapter_path(spec, a)}" for a in spec.adapters)]
    if spec.max_loras is not None:
        flags += ["--max-loras", str(spec.max_loras)]
    return flags


def source_volumes(spec: ServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes, mounts = [], []
    for i, claim in enumerate(_extra_claims(spec)):
        volumes.append({"name": f"adapter-source-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"adapter-source-{i}", "mountPath": f"{SOURCES_MOUNT}/{claim}", "readOnly": True})
    return volumes, mounts


def fetch_containers(spec: ServiceSpec, security: dict[str, Any]) -> list[dict[str, Any]]:
    """One container per set of store credentials (usually one): the AWS_* environment is per process."""
    groups: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
    for adapter in spec.adapters:
        if adapter.needs_download:
            env = s3_env(adapter.s3) if adapter.s3 else []
            groups.setdefault(json.dumps(env, sort_keys=True), (env, []))[1].append(f"{adapter.name}={adapter.source}")
    return [{
        "name": "adapters" if i == 0 else f"adapters-{i}",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-m", FETCH_MODULE],
        "args": ["--into", FETCHED_DIR, *sources],
        "env": cache_env(spec, for_server=False) + env,
        "volumeMounts": [cache_mount(spec, for_server=False), {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": security,
    } for i, (env, sources) in enumerate(groups.values())]
