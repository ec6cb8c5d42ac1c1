"""The scaling policy as a pure function: samples, current size and time in; a decision out."""

from __future__ import annotations

import pytest

from genserve.operator.autoscaler import (
    Sample,
    ScalerState,
    decide,
    learn_capacity,
    recommend,
    scale_to_zero,
    wake_up,
)
from genserve.operator.spec import AutoscalingSpec


def policy(**overrides) -> AutoscalingSpec:
    base = {"enabled": True, "min_replicas": 1, "max_replicas": 10, "target_queue_depth": 4.0,
            "tolerance": 0.1, "scale_up_stabilization_seconds": 0, "scale_down_stabilization_seconds": 60,
            "max_scale_up_step": 4, "max_scale_down_step": 1}
    return AutoscalingSpec(**{**base, **overrides})


def saturated(n: int, waiting: float, running: float = 8) -> list[Sample]:
    return [Sample(waiting=waiting, running=running) for _ in range(n)]


def test_capacity_is_learned_from_saturated_replicas():
    state = ScalerState()
    learn_capacity(state, [Sample(waiting=0, running=3)])
    assert state.capacity == 3
    learn_capacity(state, [Sample(waiting=5, running=8), Sample(waiting=0, running=2)])
    assert state.capacity == 8


def test_recommendation_is_demand_over_capacity_plus_target_queue():
    # 2 replicas, each 8 running + 16 waiting: demand 48 over (8 + 4) per replica -> 4 replicas
    raw, ratio = recommend(saturated(2, 16), policy(), capacity=8)
    assert ratio == pytest.approx(48 / 24)
    assert raw == 4


def test_within_tolerance_keeps_the_current_size():
    raw, ratio = recommend([Sample(waiting=4.2, running=8)], policy(), capacity=8)
    assert raw is None and ratio == pytest.approx(12.2 / 12)


def test_kv_cache_pressure_scales_up_without_a_queue():
    samples = [Sample(waiting=0, running=8, kv_cache_usage=0.99), Sample(waiting=0, running=8, kv_cache_usage=0.99)]
    raw, ratio = recommend(samples, policy(target_kv_cache_usage=0.66), capacity=8)
    assert ratio == pytest.approx(1.5)
    assert raw == 3


def test_scale_up_is_immediate_and_limited_by_the_step():
    state = ScalerState(capacity=8)
    d = decide(saturated(1, 100), 0, current=1, policy=policy(max_scale_up_step=3), state=state, now=0)
    assert d.reason == "ScaleUp" and d.desired == 4
    assert d.queue_depth == 100 and d.running == 8


def test_scale_up_respects_max_replicas():
    d = decide(saturated(4, 1000), 0, current=4, policy=policy(max_replicas=6), state=ScalerState(capacity=8), now=0)
    assert d.desired == 6


def test_scale_down_waits_for_the_stabilization_window():
    p, state = policy(scale_down_stabilization_seconds=60), ScalerState(capacity=8)
    assert decide(saturated(4, 10), 0, 4, p, state, now=0).desired == 6  # 72 / (8 + 4)
    idle = [Sample(waiting=0, running=1)] * 6
    for t in (10, 30, 59):
        d = decide(idle, 0, 6, p, state, now=t)
        assert d.desired == 6 and d.reason == "ScaleDownStabilizing"
    d = decide(idle, 0, 6, p, state, now=61)
    assert d.desired == 5 and d.reason == "ScaleDown"  # one step per decision


def test_busy_replicas_without_a_queue_are_kept():
    # a `waiting > threshold` policy sees 0 and shrinks; two replicas would queue 4 each, over the target of 1
    p, state = policy(scale_down_stabilization_seconds=0, target_queue_depth=1.0), ScalerState(capacity=8)
    d = decide(saturated(3, 0, running=8), 0, 3, p, state, now=0)
    assert d.desired == 3


def test_idle_capacity_is_released_down_to_the_target_queue():
    p, state = policy(scale_down_stabilization_seconds=0, max_scale_down_step=5), ScalerState(capacity=8)
    d = decide(saturated(3, 0, running=8), 0, 3, p, state, now=0)
    assert d.desired == 2 and d.reason == "ScaleDown"  # 24 requests fit 2 x (8 running + 4 waiting)


def test_no_metrics_never_changes_the_size():
    d = decide([], 3, current=5, policy=policy(), state=ScalerState(), now=0)
    assert d.desired == 5 and d.reason == "MetricsUnavailable"
    assert "no metrics from 3 ready pods" in d.message


def test_partial_metrics_never_scale_down_but_may_scale_up():
    p = policy(scale_down_stabilization_seconds=0)
    down = decide([Sample(waiting=0, running=0)], 2, current=3, policy=p, state=ScalerState(capacity=8), now=0)
    assert down.desired == 3 and down.reason == "PartialMetrics"
    up = decide(saturated(1, 50), 2, current=3, policy=p, state=ScalerState(capacity=8), now=0)
    assert up.desired == 5 and up.reason == "ScaleUp"


def test_scale_up_stabilization_needs_a_sustained_signal():
    p, state = policy(scale_up_stabilization_seconds=30), ScalerState(capacity=8)
    assert decide(saturated(1, 0, running=4), 0, 1, p, state, now=0).desired == 1
    d = decide(saturated(1, 40), 0, 1, p, state, now=10)
    assert d.desired == 1 and d.reason == "ScaleUpStabilizing"
    assert decide(saturated(1, 40), 0, 1, p, state, now=41).desired == 4


def test_bounds_are_enforced_even_without_load_change():
    d = decide(saturated(1, 4.0), 0, current=1, policy=policy(min_replicas=2), state=ScalerState(capacity=8), now=0)
    assert d.desired == 2


ZERO = AutoscalingSpec(enabled=True, min_replicas=0, max_replicas=4, scale_to_zero_after_seconds=100)


def idle(requests: float = 7.0) -> Sample:
    return Sample(waiting=0, running=0, requests_total=requests)


def zero_tick(samples, current, state, now, missing=0):
    return scale_to_zero(decide(samples, missing, current, ZERO, state, now), samples, missing, current, ZERO,
                         state, now)


def test_scales_to_zero_only_after_a_whole_idle_window():
    state = ScalerState()
    assert zero_tick([idle()], 1, state, 0).desired == 1
    assert zero_tick([idle()], 1, state, 99).desired == 1
    decision = zero_tick([idle()], 1, state, 100)
    assert decision.desired == 0 and decision.reason == "ScaleToZero" and "no requests for 100 s" in decision.message


@pytest.mark.parametrize("interruption", [
    [Sample(waiting=0, running=1, requests_total=7)],  # a request in flight
    [idle(requests=8)],  # a request came and went between two scrapes
    [Sample(waiting=0, running=0)],  # a pod without a request counter: unknown is busy
    [],  # no metrics at all
])
def test_any_sign_of_use_restarts_the_idle_clock(interruption):
    state = ScalerState()
    zero_tick([idle()], 1, state, 0)
    zero_tick(interruption, 1, state, 60)
    # the first scrape after it sees a counter it cannot compare yet (or a new value): still in use
    zero_tick([idle(9)], 1, state, 61)
    assert zero_tick([idle(9)], 1, state, 160).desired == 1  # 99 s of quiet
    assert zero_tick([idle(9)], 1, state, 161).desired == 0


def test_a_missing_pod_blocks_scaling_to_zero():
    state = ScalerState()
    zero_tick([idle()], 2, state, 0)
    assert zero_tick([idle()], 2, state, 500, missing=1).desired != 0


def test_min_replicas_above_zero_never_goes_to_zero():
    state = ScalerState()
    policy = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=4, scale_to_zero_after_seconds=10)
    for now in (0, 50, 100):
        decision = scale_to_zero(decide([idle()], 0, 1, policy, state, now), [idle()], 0, 1, policy, state, now)
    assert decision.desired == 1


def test_wake_up_on_the_first_held_request():
    state = ScalerState()
    assert wake_up(0, state, 10).desired == 0 and wake_up(0, state, 10).reason == "ScaledToZero"
    assert wake_up(None, state, 10).reason == "MetricsUnavailable" and wake_up(None, state, 10).desired == 0
    woken = wake_up(3, state, 20)
    assert woken.desired == 1 and woken.reason == "WakeUp" and state.last_activity == 20
    # the idle clock restarts at the wake-up, and again when the replica's counter first shows up
    assert zero_tick([idle()], 1, state, 110).desired == 1
    assert zero_tick([idle()], 1, state, 209).desired == 1
    assert zero_tick([idle()], 1, state, 210).desired == 0
