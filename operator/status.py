"""Status of a TextGenerationService: standard conditions and one serialized writer per object."""

from __future__ import annotations

import datetime
import threading
from collections import defaultdict
from typing import Any

from genserve.operator.kube import Kube, NotFound

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "ScalingActive", "CacheReady")
# handlers, the autoscaler daemon and child events all write status; each write is read-merge-patch
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str,
                  generation: int | None = None) -> list[dict[str, Any]]:
    """A new list with the condition set; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    condition = {"type": type_, "status": value, "reason": reason, "message": message,
                 "lastTransitionTime": now_iso() if changed else old.get("lastTransitionTime", now_iso())}
    if generation is not None:
        condition["observedGeneration"] = generation
    out = [c for c in conditions if c.get("type") != type_] + [condition]
    return sorted(out, key=lambda c: CONDITION_TYPES.index(c["type"]) if c["type"] in CONDITION_TYPES else 99)


def write_status(kube: Kube, namespace: str, name: str, fields: dict[str, Any],
                 conditions: dict[str, tuple[bool, str, str]] | None = None) -> dict[str, Any] | None:
    """Merge `fields` and `conditions` ({type: (status, reason, message)}) into the live status."""
    with _locks[(namespace, name)]:
        body = kube.get("TextGenerationService", namespace, name)
        if body is None:
            return None
        status = body.get("status") or {}
        merged = list(status.get("conditions") or [])
        generation = body["metadata"].get("generation")
        for type_, (value, reason, message) in (conditions or {}).items():
            merged = set_condition(merged, type_, value, reason, message, generation)
        patch = dict(fields)
        if conditions:
            patch["conditions"] = merged
        current = {k: status.get(k) for k in patch}
        if _same(current, patch):
            return status
        try:
            return kube.merge_patch("TextGenerationService", namespace, name, {"status": patch}, "status")
        except NotFound:
            return None


def _same(current: dict[str, Any], patch: dict[str, Any]) -> bool:
    # a condition rewritten with the same content is no change, whatever its timestamps
    def strip(value: Any) -> Any:
        if isinstance(value, dict):  # a None in a merge patch deletes: the same as absent
            return {k: v for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [{k: v for k, v in c.items() if k != "lastTransitionTime"} if isinstance(c, dict) else c
                    for c in value]
        return value
    return all(strip(current.get(k)) == strip(v) for k, v in patch.items())


def deployment_status(deployment: dict[str, Any] | None, desired: int,
                      scales_to_zero: bool = False) -> tuple[dict[str, Any], dict]:
    """Status fields and Ready/Progressing conditions derived from the Deployment."""
    st = (deployment or {}).get("status") or {}
    replicas, ready = st.get("replicas", 0), st.get("readyReplicas", 0)
    updated = st.get("updatedReplicas", 0)
    fields = {"replicas": replicas, "readyReplicas": ready}
    if deployment is None:
        return fields, {"Ready": (False, "DeploymentMissing", "the Deployment does not exist"),
                        "Progressing": (True, "Creating", "creating the Deployment")}
    stalled = any(c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
                  for c in st.get("conditions") or [])
    if scales_to_zero and desired == 0 and replicas == 0:
        # serving in the sense that matters: the activator takes requests and starts a replica
        return fields, {"Ready": (True, "ScaledToZero", "no replicas; the activator starts one on the next request"),
                        "Progressing": (False, "ScaledToZero", "scaled to zero")}
    conditions = {
        "Ready": (ready >= 1, "ReplicasReady" if ready >= 1 else "NoReplicasReady",
                  f"{ready}/{desired} replicas ready"),
        "Progressing": ((ready < desired or updated < desired) and not stalled,
                        "ProgressDeadlineExceeded" if stalled else
                        ("RollingOut" if ready < desired or updated < desired else "RolloutComplete"),
                        f"{updated} updated, {ready} ready of {desired} desired"),
    }
    return fields, conditions
