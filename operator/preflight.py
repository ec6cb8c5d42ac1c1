"""What must hold before pods are scheduled: the Secrets and claims they reference exist, and a shared
cache has been filled. Each check reads the API and answers with a reason for the status, never raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genserve.operator import adapters, cache_volumes
from genserve.operator.kube import Kube
from genserve.operator.spec import ServiceSpec


@dataclass(slots=True)
class Problem:
    reason: str
    message: str


def missing_reference(kube: Kube, namespace: str, name: str, spec: ServiceSpec) -> Problem | None:
    """A referenced Secret, Secret key or claim that is not there: the pods would fail to start with it."""
    refs = spec.model.secret_refs() + adapters.secret_refs(spec.adapters)
    if spec.api_key_secret:
        refs.append(("spec.apiKeySecretRef", spec.api_key_secret))
    for where, ref in refs:
        secret = kube.get("Secret", namespace, ref.name)
        if secret is None:
            return Problem("SecretNotFound", f"Secret {ref.name} ({where}) does not exist in {namespace}")
        if ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
            return Problem("SecretKeyNotFound", f"Secret {ref.name} ({where}) has no key {ref.key!r}")
    claims = []
    if spec.model.pvc:
        claims.append(("spec.model.source", spec.model.pvc.claim))
    if spec.cache.is_shared and spec.cache.existing_claim:
        claims.append(("spec.cache.existingClaim", spec.cache.existing_claim))
    claims += [(f"spec.adapters ({a.name})", a.pvc.claim) for a in spec.adapters if a.pvc]
    for where, claim in claims:
        if kube.get("PersistentVolumeClaim", namespace, claim) is None:
            return Problem("ClaimNotFound", f"PersistentVolumeClaim {claim} ({where}) does not exist in {namespace}")
    return None


@dataclass(slots=True)
class FillState:
    filled: bool
    status: dict[str, Any]
    condition: tuple[bool, str, str]
    failed: bool = False


def fill_state(kube: Kube, namespace: str, name: str, spec: ServiceSpec, status: dict[str, Any]) -> FillState:
    """Whether the shared claim holds the model; once a Job filled it, status remembers (a Job may be
    deleted after it finished, and its pods must not block a running service)."""
    cache = cache_volumes.claim_name(name, spec)
    # None clears a key the merge patch would otherwise keep from an earlier mode
    fields: dict[str, Any] = {"mode": spec.cache.mode, "claimName": cache, "fillJob": None, "filledJob": None}
    if spec.model.pvc is not None and not cache_volumes.uses_fill_job(spec):
        return FillState(True, {**fields, "phase": "SourceMounted"},
                         (True, "SourceMounted", f"the model is read from claim {spec.model.pvc.claim} (pvc:// source)"))
    if not cache_volumes.uses_fill_job(spec):
        how = "a per-pod volume" if not spec.cache.is_shared else f"claim {cache}"
        return FillState(True, {**fields, "phase": "InitStep"},
                         (True, "FilledByInitStep", f"each pod's init step fills {how}"))
    job_name = cache_volumes.fill_job_name(name, spec)
    fields["fillJob"] = job_name
    if (status.get("cache") or {}).get("filledJob") == job_name:
        return FillState(True, {**fields, "phase": "Filled", "filledJob": job_name},
                         (True, "Filled", f"Job {job_name} filled claim {cache}"))
    phase = cache_volumes.job_phase(kube.get("Job", namespace, job_name))
    if phase == "Filled":
        return FillState(True, {**fields, "phase": phase, "filledJob": job_name},
                         (True, "Filled", f"Job {job_name} filled claim {cache}"))
    if phase == "Failed":
        return FillState(False, {**fields, "phase": phase},
                         (False, "FillFailed", f"Job {job_name} failed to fill claim {cache}; see its pod logs"),
                         failed=True)
    return FillState(False, {**fields, "phase": "Filling"},
                     (False, "Filling", f"Job {job_name} is filling claim {cache}; the pods start after it"))


def remove_stale_fill_jobs(kube: Kube, namespace: str, name: str, spec: ServiceSpec, owner_uid: str) -> list[str]:
    """Fill Jobs of an earlier model, image or claim (or of a cache that needs none any more)."""
    current = cache_volumes.fill_job_name(name, spec) if cache_volumes.uses_fill_job(spec) else None
    removed = []
    for job in kube.list("Job", namespace, cache_volumes.fill_job_selector(name)):
        meta = job["metadata"]
        owned = any(r.get("uid") == owner_uid for r in meta.get("ownerReferences") or [])
        if meta["name"] != current and owned and kube.delete("Job", namespace, meta["name"]):
            removed.append(f"Job {meta['name']}")
    return removed
