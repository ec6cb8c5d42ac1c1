"""The queue-depth scaling policy: pure functions of metric samples, the current size and past decisions.

    demand    = waiting + running requests over the ready replicas
    per_pod   = learned batch capacity (running requests a saturated replica sustains) + targetQueueDepth
    ratio     = demand / (ready * per_pod)           (HPA-style; kv ratio = mean usage / targetKvCacheUsage)
    raw       = ceil(ready * max(ratio, kv ratio))   unchanged while |ratio - 1| <= tolerance
    desired   = HPA stabilization: up to min(raw over the up-window), down to max(raw over the down-window),
                then at most maxScaleUpStep / maxScaleDownStep per decision, within [min, max].

Counting running requests, not only the waiting ones, is what keeps a busy replica from being removed
the moment its queue drains (the oscillation of a `num_requests_waiting > 5` threshold).
Missing metrics never scale down: with no samples the size is kept, with some pods missing only up.

Scale to zero (minReplicas 0): after `scaleToZeroAfterSeconds` in which every replica answered with an
empty queue, nothing running and an unchanged request counter, the size goes to 0; requests then reach
the activator, and one held there brings the size back to 1 (`wake_up`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from genserve.operator.spec import AutoscalingSpec


@dataclass(slots=True)
class Sample:
    waiting: float
    running: float
    kv_cache_usage: float | None = None
    requests_total: float | None = None  # the pod's request counter (idleness between two scrapes)


@dataclass(slots=True)
class ScalerState:
    """Per-service memory between decisions (kept in kopf's per-object memo)."""
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    capacity: float = 1.0
    last_activity: float | None = None  # last tick that showed (or could not rule out) a request
    last_requests_total: float | None = None


@dataclass(slots=True)
class Decision:
    desired: int
    reason: str
    message: str
    queue_depth: float | None = None
    running: float | None = None
    kv_cache_usage: float | None = None


def learn_capacity(state: ScalerState, samples: list[Sample]) -> float:
    # a replica with a queue is saturated: its running count is the batch it sustains
    for s in samples:
        if s.waiting > 0 or s.running > state.capacity:
            state.capacity = max(state.capacity, s.running)
    return state.capacity


def recommend(samples: list[Sample], policy: AutoscalingSpec, capacity: float) -> tuple[int | None, float]:
    """The raw total replica count for these samples (None within the tolerance band), and the load ratio."""
    ready = len(samples)
    demand = sum(s.waiting + s.running for s in samples)
    ratio = demand / (ready * (capacity + policy.target_queue_depth))
    kv = [s.kv_cache_usage for s in samples if s.kv_cache_usage is not None]
    if kv:
        ratio = max(ratio, (sum(kv) / len(kv)) / policy.target_kv_cache_usage)
    if abs(ratio - 1.0) <= policy.tolerance:
        return None, ratio
    return max(1, math.ceil(ready * ratio - 1e-9)), ratio


def _window(state: ScalerState, now: float, seconds: float) -> list[int]:
    return [r for t, r in state.recommendations if now - t <= seconds]


def decide(samples: list[Sample], num_missing: int, current: int, policy: AutoscalingSpec, state: ScalerState,
           now: float) -> Decision:
    """One scaling decision. `samples` come from ready pods; `num_missing` ready pods gave no metrics."""
    lo, hi = policy.min_replicas, policy.max_replicas
    if not samples:
        desired = min(max(current, lo), hi)
        return Decision(desired, "MetricsUnavailable",
                        f"no metrics from {num_missing} ready pods; keeping {desired} replicas")
    waiting = sum(s.waiting for s in samples)
    running = sum(s.running for s in samples)
    kv = [s.kv_cache_usage for s in samples if s.kv_cache_usage is not None]
    mean_kv = sum(kv) / len(kv) if kv else None
    metrics = {"queue_depth": waiting, "running": running, "kv_cache_usage": mean_kv}

    capacity = learn_capacity(state, samples)
    raw, ratio = recommend(samples, policy, capacity)
    # an absolute count, so replicas still starting already count towards it
    raw = current if raw is None else raw
    state.recommendations.append((now, raw))
    horizon = max(policy.scale_up_stabilization_seconds, policy.scale_down_stabilization_seconds)
    state.recommendations = [(t, r) for t, r in state.recommendations if now - t <= horizon]

    up_to = min(_window(state, now, policy.scale_up_stabilization_seconds))
    down_to = max(_window(state, now, policy.scale_down_stabilization_seconds))
    detail = f"queue {waiting:g}, running {running:g}, capacity {capacity:g}/replica, ratio {ratio:.2f}"
    if up_to > current:
        desired, reason = min(up_to, current + policy.max_scale_up_step), "ScaleUp"
    elif down_to < current:
        if num_missing:
            desired, reason = current, "PartialMetrics"
            detail += f"; {num_missing} ready pods gave no metrics, not scaling down"
        else:
            desired, reason = max(down_to, current - policy.max_scale_down_step), "ScaleDown"
    else:
        desired = current
        if raw > current:
            reason = "ScaleUpStabilizing"
        elif raw < current:
            reason = "ScaleDownStabilizing"
        else:
            reason = "WithinTolerance"
    bounded = min(max(desired, lo), hi)
    if bounded != desired:
        reason = "AtMaxReplicas" if desired > hi else "AtMinReplicas"
        if bounded != current:
            reason = "ScaleUp" if bounded > current else "ScaleDown"
    return Decision(bounded, reason, f"{current} -> {bounded} replicas: {detail}", **metrics)


def idle_seconds(samples: list[Sample], num_missing: int, state: ScalerState, now: float) -> float:
    """How long the service has shown no sign of use. Anything unknown (no samples, a pod without
    metrics or without a request counter) counts as use: scaling to zero needs evidence."""
    counters = [s.requests_total for s in samples]
    total = sum(counters) if samples and None not in counters else None
    busy = (not samples or num_missing > 0 or total is None or total != state.last_requests_total
            or any(s.waiting > 0 or s.running > 0 for s in samples))
    if busy or state.last_activity is None:
        state.last_activity = now
    state.last_requests_total = total
    return now - state.last_activity


def scale_to_zero(decision: Decision, samples: list[Sample], num_missing: int, current: int,
                  policy: AutoscalingSpec, state: ScalerState, now: float) -> Decision:
    """`decision`, or 0 replicas when minReplicas is 0 and the service has been idle long enough."""
    idle = idle_seconds(samples, num_missing, state, now)
    if policy.min_replicas > 0 or current == 0 or idle < policy.scale_to_zero_after_seconds:
        return decision
    state.recommendations.clear()
    return Decision(0, "ScaleToZero", f"{current} -> 0 replicas: no requests for {idle:.0f} s "
                    f"(scaleToZeroAfterSeconds {policy.scale_to_zero_after_seconds})",
                    queue_depth=decision.queue_depth, running=decision.running,
                    kv_cache_usage=decision.kv_cache_usage)


def wake_up(held: float | None, state: ScalerState, now: float) -> Decision:
    """At 0 replicas: one replica as soon as the activator holds a request."""
    if held is None:
        return Decision(0, "MetricsUnavailable", "scaled to zero; the activator gave no metrics")
    if held > 0:
        state.last_activity = now  # the idle clock starts again from the wake-up
        return Decision(1, "WakeUp", f"0 -> 1 replicas: the activator holds {held:g} requests", queue_depth=held,
                        running=0.0)
    return Decision(0, "ScaledToZero", "scaled to zero; the activator starts a replica on the next request",
                    queue_depth=0.0, running=0.0)
