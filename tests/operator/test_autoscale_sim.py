"""The simulation's baselines behave as the systems they stand for (KEDA's HPA, HPA on CPU)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import autoscale_sim as sim  # noqa: E402

from genserve.operator.spec import AutoscalingSpec  # noqa: E402

MODEL = sim.ServerModel(step_points=[(1, 0.06), (8, 0.15), (32, 0.18)], ready_seconds=20.0)


def ready_replicas(n: int, waiting: int = 0, running: int = 0) -> list[sim.Replica]:
    out = []
    for _ in range(n):
        r = sim.Replica(created=0.0, ready_at=0.0)
        r.queue.extend(sim.Request(arrival=0.0, tokens=10) for _ in range(waiting))
        r.running.extend(sim.Request(arrival=0.0, tokens=10) for _ in range(running))
        out.append(r)
    return out


def test_step_time_interpolates_the_measured_points():
    assert MODEL.step_seconds(1) == 0.06 and MODEL.step_seconds(32) == 0.18
    assert MODEL.step_seconds(20) == pytest.approx(0.15 + 0.03 * 12 / 24)


def test_keda_scales_to_total_waiting_over_five_limited_by_the_hpa_rate():
    keda = sim.KedaThreshold(1, 16)
    replicas = ready_replicas(2, waiting=25)
    keda.observe(0.0, replicas)
    assert keda.scraped == 50
    assert keda.maybe_decide(0.0, 2, replicas, None) == 6  # wants 10; max(100 %, 4 pods) per period


def test_hpa_scale_down_waits_for_its_300_second_window():
    keda = sim.KedaThreshold(1, 16)
    busy = ready_replicas(4, waiting=5)
    keda.observe(0.0, busy)
    assert keda.maybe_decide(0.0, 4, busy, None) == 4
    idle = ready_replicas(4)
    for t in (15.0, 150.0, 285.0):
        keda.observe(t, idle)
        assert keda.maybe_decide(t, 4, idle, None) == 4
    keda.observe(315.0, idle)
    assert keda.maybe_decide(315.0, 4, idle, None) == 1


def test_cpu_of_a_busy_gpu_pod_stays_under_the_target():
    hpa = sim.HpaCpu(1, 16)
    replicas = ready_replicas(1, running=32)
    replicas[0].busy_seconds, replicas[0].tokens_done = 15.0, 15.0 / 0.18 * 32
    util = (1.0 * 15.0 + 0.0005 * replicas[0].tokens_done) / 15.0 / 2.0
    assert util < hpa.target
    assert hpa.maybe_decide(15.0, 1, replicas, None) == 1


def test_a_short_day_runs_and_accounts_replica_seconds():
    trace = sim.make_trace(600.0, night_rps=0.5, peak_rps=4.0, rng=random.Random(3))
    spec = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=8)
    result = sim.simulate(sim.Ours(spec), trace, MODEL, startup=30.0, seed=3)
    assert result.requests > 0 and 0.0 <= result.slo_attainment <= 1.0
    assert result.p50_wait <= result.p99_wait
    assert result.replica_seconds >= 600.0  # never below one replica
    assert 1 <= result.max_replicas <= 8 + 1  # a draining replica may overlap its replacement


def test_load_aware_routing_picks_the_shortest_queue_then_the_most_free_kv():
    short, long_ = ready_replicas(1, waiting=1, running=32)[0], ready_replicas(1, waiting=6, running=32)[0]
    assert sim.pick_endpoint([long_, short], max_batch=32) == [short]
    busy, free = ready_replicas(1, running=30)[0], ready_replicas(1, running=4)[0]
    assert sim.pick_endpoint([busy, free], max_batch=32) == [free]
    # a short queue on a full batch against an empty queue on a half batch: the empty queue wins
    full, half = ready_replicas(1, waiting=2, running=32)[0], ready_replicas(1, running=16)[0]
    assert sim.pick_endpoint([full, half], max_batch=32) == [half]
    twins = ready_replicas(2, running=8)
    assert sim.pick_endpoint(twins, max_batch=32) == twins


def test_load_aware_routing_keeps_every_replica_busy_before_any_queues():
    cluster = sim.Cluster(MODEL, startup_seconds=0.0, rng=random.Random(0), routing="load-aware")
    cluster.replicas = ready_replicas(4)
    for _ in range(4 * 32):
        cluster.route(1.0, sim.Request(arrival=1.0, tokens=10))
        cluster.step(1.0, 0.0, [])
    assert [len(r.running) for r in cluster.replicas] == [32] * 4 and not any(r.queue for r in cluster.replicas)
    spread = sim.Cluster(MODEL, startup_seconds=0.0, rng=random.Random(0), routing="random")
    spread.replicas = ready_replicas(4)
    for _ in range(4 * 32):
        spread.route(1.0, sim.Request(arrival=1.0, tokens=10))
        spread.step(1.0, 0.0, [])
    assert any(r.queue for r in spread.replicas)  # kube-proxy's random choice queues beside free slots
