"""Level-based reconciliation and the autoscaler tick: the impure glue between kopf, the API and the builders."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from genserve.operator import (
    adapter_status,
    autoscaler,
    cache_volumes,
    gateway_routes,
    metrics_scrape,
    preflight,
    reconcile,
    status,
)
from genserve.operator.kube import Kube
from genserve.operator.settings import SERVICE_LABEL, OperatorSettings
from genserve.operator.spec import ServiceSpec, SpecError, parse_spec

KIND = "TextGenerationService"


@dataclass(slots=True)
class Context:
    kube: Kube
    settings: OperatorSettings


def parse_or_degrade(ctx: Context, body: dict[str, Any]) -> ServiceSpec:
    """The parsed spec; an invalid one is recorded as Degraded and raised as a permanent error."""
    meta = body["metadata"]
    try:
        spec = parse_spec(dict(body.get("spec") or {}), ctx.settings.default_image)
    except SpecError as e:
        status.write_status(ctx.kube, meta["namespace"], meta["name"],
                            {"observedGeneration": meta.get("generation")},
                            {"Degraded": (True, e.reason, str(e)),
                             "Ready": (False, e.reason, "the spec is invalid"),
                             "Progressing": (False, e.reason, "waiting for a valid spec")})
        kopf.event(body, type="Warning", reason=e.reason, message=str(e))
        raise kopf.PermanentError(f"{e.reason}: {e}") from e
    return spec


def _replicas_of(deployment: dict[str, Any] | None) -> int | None:
    return None if deployment is None else deployment.get("spec", {}).get("replicas")


def _is_owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


def reconcile_service(ctx: Context, body: dict[str, Any], logger: logging.Logger,
                      is_resync: bool = False) -> list[str]:
    """Create or patch every child to its desired state, remove unwanted ones, and refresh status.
    Returns the children that were created, changed or deleted."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    if meta.get("deletionTimestamp"):
        return []
    if is_resync:
        try:
            parse_spec(dict(body.get("spec") or {}), ctx.settings.default_image)
        except SpecError:
            return []  # already reported as Degraded when the spec changed
    spec = parse_or_degrade(ctx, body)
    problem = preflight.missing_reference(ctx.kube, namespace, name, spec)
    if problem is not None:
        _degrade(ctx, body, problem, announce=not is_resync)
        return []  # the resync timer looks again; nothing is scheduled that could only crash
    live = ctx.kube.get("Deployment", namespace, name)
    replicas = reconcile.desired_replicas(spec, body.get("status") or {}, _replicas_of(live))
    has_sm = ctx.kube.has_resource("monitoring.coreos.com/v1", "servicemonitors")
    has_pool = spec.inference_pool.enabled and has_inference_pool_api(ctx)
    fill = preflight.fill_state(ctx.kube, namespace, name, spec, body.get("status") or {})
    wanted, absent = reconcile.build_children(name, namespace, spec, ctx.settings, replicas, has_sm,
                                              reconcile.routes_to_activator(spec, live), fill.filled, has_pool)
    problems, changed = [], []
    for obj in wanted:
        kopf.append_owner_reference(obj, owner=body)
        kind, child = obj["kind"], obj["metadata"]["name"]
        before = ctx.kube.get(kind, namespace, child)
        if kind == "Deployment" and child == name and before is not None:
            # the autoscaler may have scaled since `live` was read: apply on top of its latest count
            replicas = reconcile.desired_replicas(spec, body.get("status") or {}, _replicas_of(before))
            obj["spec"]["replicas"] = replicas
        try:
            after = ctx.kube.apply(obj)
            if kind == "Service":
                after = _drop_stale_selector_keys(ctx, obj, after)
        except ApiException as e:
            if is_transient(e):
                raise  # the whole pass is retried with backoff (main.tgs_reconcile)
            # e.g. an immutable PVC field: report it, keep reconciling the rest
            problems.append(f"{kind} {child}: {e.status} {e.reason}")
            continue
        if before is None:
            kopf.event(body, type="Normal", reason="Created", message=f"created {kind} {child}")
            logger.info(f"created {kind} {child}")
            changed.append(f"{kind} {child}")
        elif before["metadata"].get("resourceVersion") != after["metadata"].get("resourceVersion"):
            kopf.event(body, type="Normal", reason="Updated", message=f"updated {kind} {child}")
            changed.append(f"{kind} {child}")
    for kind, child in absent:
        try:
            existing = ctx.kube.get(kind, namespace, child)
        except ApiException as e:
            if e.status != 403:
                raise
            continue  # an API we are not granted (chart rbac.inferenceExtension off): we never made one
        if existing is not None and _is_owned_by(existing, meta["uid"]):
            ctx.kube.delete(kind, namespace, child)
            kopf.event(body, type="Normal", reason="Deleted", message=f"deleted {kind} {child}: no longer wanted")
            changed.append(f"{kind} {child}")
    if spec.cache.is_shared or ((body.get("status") or {}).get("cache") or {}).get("fillJob"):
        changed += preflight.remove_stale_fill_jobs(ctx.kube, namespace, name, spec, meta["uid"])
    deployment = ctx.kube.get("Deployment", namespace, name)
    fields, conditions = status.deployment_status(deployment, replicas, spec.scales_to_zero)
    fields.update(observedGeneration=meta.get("generation"), selector=f"{SERVICE_LABEL}={name}",
                  endpoint=reconcile.endpoint(name, namespace, ctx.settings.cluster_domain), desiredReplicas=replicas)
    fill = preflight.fill_state(ctx.kube, namespace, name, spec, body.get("status") or {})
    fields["cache"], conditions["CacheReady"] = fill.status, fill.condition
    fields.update(_adapters_status(ctx, namespace, name, spec))
    if not fill.filled and deployment is None:
        conditions["Progressing"] = (not fill.failed, fill.condition[1], fill.condition[2])
    if spec.inference_pool.enabled and not has_pool:
        problems.append("spec.routing.inferencePool needs the Gateway API Inference Extension CRDs "
                        "(inference.networking.k8s.io/v1 InferencePool, gateway.networking.k8s.io/v1 HTTPRoute), "
                        "which this cluster does not serve; the Service and Ingress still route")
        reason = "InferencePoolUnavailable"
    else:
        reason = "FillFailed" if fill.failed else "ApplyFailed"
    if fill.failed:
        problems.append(fill.condition[2])
    if problems:
        conditions["Degraded"] = (True, reason, "; ".join(problems))
        if not is_resync:
            kopf.event(body, type="Warning", reason=reason, message="; ".join(problems))
    else:
        conditions["Degraded"] = (False, "Reconciled", "all children match the spec")
    if not spec.autoscaling.enabled:
        conditions["ScalingActive"] = (False, "AutoscalingDisabled", f"fixed at spec.replicas={spec.replicas}")
    status.write_status(ctx.kube, namespace, name, fields, conditions)
    return changed


# a conflict, throttling, or the API server (or the way to it) failing: worth another pass soon; anything
# else from the API (invalid, forbidden, immutable field) is reported in status instead
TRANSIENT_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.5, 60.0


def is_transient(error: BaseException) -> bool:
    if isinstance(error, ApiException):
        return not error.status or error.status in TRANSIENT_STATUSES  # status 0: no answer (TLS, socket)
    return isinstance(error, (urllib3.exceptions.HTTPError, OSError))  # timeouts, dropped connections


def retry_delay(retry: int) -> float:
    """Exponential backoff for a reconcile pass that hit a transient error (kopf's `retry` counts them)."""
    return min(RETRY_FIRST_SECONDS * 2 ** retry, RETRY_MAX_SECONDS)


def has_inference_pool_api(ctx: Context) -> bool:
    """Discovery: both the InferencePool and the HTTPRoute API are served."""
    return all(ctx.kube.has_resource(*api) for api in (gateway_routes.POOL_API, gateway_routes.ROUTE_API))


def _degrade(ctx: Context, body: dict[str, Any], problem: preflight.Problem, announce: bool) -> None:
    meta = body["metadata"]
    status.write_status(ctx.kube, meta["namespace"], meta["name"], {"observedGeneration": meta.get("generation")},
                        {"Degraded": (True, problem.reason, problem.message),
                         "Ready": (False, problem.reason, "a reference of the spec is missing"),
                         "Progressing": (False, problem.reason, "waiting for the missing reference")})
    if announce:
        kopf.event(body, type="Warning", reason=problem.reason, message=problem.message)


def _has_stale_selector_keys(desired: dict[str, Any], live: dict[str, Any]) -> bool:
    """A key added to a Service's selector by hand: not drift of a field we set, yet it selects no pod."""
    if desired["kind"] != "Service":
        return False
    return bool(set((live.get("spec") or {}).get("selector") or {}) - set(desired["spec"]["selector"]))


def _drop_stale_selector_keys(ctx: Context, desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """A Service's selector must be exactly ours: switching between the server pods and the activator
    leaves the other key behind wherever apply merges instead of dropping what we no longer set (another
    field manager co-owning it, or an emulator)."""
    stale = set((live.get("spec") or {}).get("selector") or {}) - set(desired["spec"]["selector"])
    if not stale:
        return live
    meta = desired["metadata"]
    return ctx.kube.merge_patch("Service", meta["namespace"], meta["name"],
                                {"spec": {"selector": dict.fromkeys(sorted(stale))}})


def is_drifted(actual: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Whether any field we set differs (fields added by the API server or others are ignored)."""
    if isinstance(desired, dict):
        return not isinstance(actual, dict) or any(is_drifted(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (not isinstance(actual, list) or len(actual) != len(desired)
                or any(is_drifted(a, d) for a, d in zip(actual, desired, strict=True)))
    return actual != desired and str(actual) != str(desired)


def owner_of(ctx: Context, child: dict[str, Any]) -> dict[str, Any] | None:
    meta = child["metadata"]
    name = (meta.get("labels") or {}).get(SERVICE_LABEL)
    owner = ctx.kube.get(KIND, meta["namespace"], name) if name else None
    if owner is None or owner["metadata"].get("deletionTimestamp") or not _is_owned_by(child, owner["metadata"]["uid"]):
        return None
    return owner


def on_child_event(ctx: Context, event_type: str, child: dict[str, Any], logger: logging.Logger) -> None:
    """Restore a child deleted or edited by hand; mirror the Deployment's progress into the owner's status."""
    owner = owner_of(ctx, child)
    if owner is None:
        return
    kind, name = child["kind"], child["metadata"]["name"]
    meta = owner["metadata"]
    try:
        spec = parse_spec(dict(owner.get("spec") or {}), ctx.settings.default_image)
    except SpecError:
        return
    if kind == "Job":
        if event_type == "MODIFIED" and cache_volumes.job_phase(child) != "Filling":
            reconcile_service(ctx, owner, logger)  # filled: start the Deployment; failed: report it
        return
    if event_type == "DELETED":
        if (kind, name) in _unwanted(ctx, owner, spec):
            return  # our own clean-up (an optional child no longer asked for), not a loss
        logger.info(f"{kind} {name} was deleted; restoring it")
        kopf.event(owner, type="Warning", reason="Restoring", message=f"{kind} {name} was deleted; recreating it")
        reconcile_service(ctx, owner, logger)
        return
    is_server = kind == "Deployment" and name == meta["name"]  # not the activator's Deployment
    if is_server and spec.scales_to_zero and reconcile.routes_to_activator(spec, child) != _routes_to_activator_now(
            ctx, meta["namespace"], meta["name"]):
        # a server pod became ready (or the last one went): point the Service at the pods or the activator
        reconcile_service(ctx, owner, logger)
        return
    live = child if is_server else ctx.kube.get("Deployment", meta["namespace"], meta["name"])
    replicas = reconcile.desired_replicas(spec, owner.get("status") or {}, _replicas_of(live))
    has_sm = ctx.kube.has_resource("monitoring.coreos.com/v1", "servicemonitors")
    wanted, _ = reconcile.build_children(meta["name"], meta["namespace"], spec, ctx.settings, replicas, has_sm,
                                         reconcile.routes_to_activator(spec, live))
    desired = next((o for o in wanted if o["kind"] == kind and o["metadata"]["name"] == name), None)
    if desired is not None and (is_drifted(child, {"spec": desired.get("spec"), "metadata": {
            "labels": desired["metadata"]["labels"]}}) or _has_stale_selector_keys(desired, child)):
        # the API server may normalize a value (cpu "0.5" -> "500m"): only a real re-apply is a restore
        if reconcile_service(ctx, owner, logger):
            kopf.event(owner, type="Warning", reason="Restored", message=f"{kind} {name} was changed by hand; restored it")
    elif is_server:
        fields, conditions = status.deployment_status(child, replicas, spec.scales_to_zero)
        fields.update(_adapters_status(ctx, meta["namespace"], meta["name"], spec))
        status.write_status(ctx.kube, meta["namespace"], meta["name"], fields, conditions)


def _adapters_status(ctx: Context, namespace: str, name: str, spec: ServiceSpec) -> dict[str, Any]:
    return adapter_status.adapters_status(ctx.kube, namespace, reconcile.selector(name), spec,
                                          ctx.settings.scrape_timeout_seconds)


def _unwanted(ctx: Context, owner: dict[str, Any], spec: ServiceSpec) -> list[tuple[str, str]]:
    meta = owner["metadata"]
    has_sm = ctx.kube.has_resource("monitoring.coreos.com/v1", "servicemonitors")
    _, absent = reconcile.build_children(meta["name"], meta["namespace"], spec, ctx.settings, 1, has_sm)
    return absent


def _routes_to_activator_now(ctx: Context, namespace: str, name: str) -> bool:
    service = ctx.kube.get("Service", namespace, name)
    selector = ((service or {}).get("spec") or {}).get("selector") or {}
    return reconcile.ACTIVATOR_LABEL in selector


def autoscale_tick(ctx: Context, body: dict[str, Any], state: autoscaler.ScalerState,
                   logger: logging.Logger) -> autoscaler.Decision | None:
    """Scrape, decide, scale the Deployment, and record the decision in status and as an Event."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    try:
        spec = parse_spec(dict(body.get("spec") or {}), ctx.settings.default_image)
    except SpecError:
        return None
    if not spec.autoscaling.enabled:
        return None
    deployment = ctx.kube.get("Deployment", namespace, name)
    if deployment is None:
        return None
    current = deployment["spec"].get("replicas", 1)
    policy = spec.autoscaling
    if spec.scales_to_zero and current == 0:
        activators = [p for p in ctx.kube.list("Pod", namespace, reconcile.activator_selector(name))
                      if metrics_scrape.is_pod_ready(p)]
        held = metrics_scrape.scrape_activator(activators, ctx.settings.scrape_timeout_seconds)
        return _apply_decision(ctx, body, autoscaler.wake_up(held, state, time.time()), current, {}, logger)
    errors: dict[str, str] = {}
    pods = [p for p in ctx.kube.list("Pod", namespace, reconcile.selector(name)) if metrics_scrape.is_pod_ready(p)]
    if policy.metrics_source == "prometheus":
        try:
            samples, absent = metrics_scrape.query_prometheus(
                policy.prometheus_url, namespace, name, [p["metadata"]["name"] for p in pods],
                ctx.settings.scrape_timeout_seconds)
            errors = {pod: "no series in Prometheus" for pod in absent}
            missing = len(absent)
        except Exception as e:  # any failure is "no data"
            samples, missing, errors = [], 1, {"prometheus": f"{type(e).__name__}: {e}"}
    else:
        samples, errors = metrics_scrape.scrape_pods(pods, ctx.settings.scrape_timeout_seconds)
        missing = len(errors)
    now = time.time()
    decision = autoscaler.decide(samples, missing, current, policy, state, now)
    if spec.scales_to_zero:
        decision = autoscaler.scale_to_zero(decision, samples, missing, current, policy, state, now)
    return _apply_decision(ctx, body, decision, current, errors, logger)


def _apply_decision(ctx: Context, body: dict[str, Any], decision: autoscaler.Decision, current: int,
                    errors: dict[str, str], logger: logging.Logger) -> autoscaler.Decision:
    """Record the decision in status (and as an Event when it scales), then scale the Deployment."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    fields: dict[str, Any] = {"desiredReplicas": decision.desired}
    if decision.queue_depth is not None:
        fields.update(queueDepth=decision.queue_depth, runningRequests=decision.running)
    if decision.kv_cache_usage is not None:
        fields["kvCacheUsage"] = round(decision.kv_cache_usage, 4)
    message = decision.message
    if errors:
        message += "; unreachable: " + ", ".join(f"{k} ({v})" for k, v in sorted(errors.items()))
    if decision.desired != current:
        stamp = status.now_iso()
        fields.update(lastScaleTime=stamp, lastScaleDecision={
            "time": stamp, "fromReplicas": current, "toReplicas": decision.desired, "reason": decision.reason,
            "message": message})
    active = decision.reason != "MetricsUnavailable"
    # status first: a reconcile triggered by the Deployment change must already see the new count
    status.write_status(ctx.kube, namespace, name, fields, {"ScalingActive": (active, decision.reason, message)})
    if decision.desired != current:
        ctx.kube.merge_patch("Deployment", namespace, name, {"spec": {"replicas": decision.desired}})
        if decision.desired == 0:  # the Service moves to the activator now, not when the pods are gone
            owner = ctx.kube.get(KIND, namespace, name)
            if owner is not None:
                reconcile_service(ctx, owner, logger)
        kopf.event(body, type="Normal", reason="Scaled", message=f"{decision.reason}: {message}")
        logger.info(f"scaled {current} -> {decision.desired}: {message}")
    return decision
