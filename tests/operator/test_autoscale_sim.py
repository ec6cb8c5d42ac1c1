"""The simulation's baselines behave as the systems they stand for (KEDA's HPA, HPA on CPU)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import autoscale_sim as sim  # noqa: E402

from genserve.operator.spec import AutoscalingSpec, parse_autoscaling  # noqa: E402

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


def test_every_policy_gets_a_fresh_copy_of_the_same_arrivals():
    trace = sim.make_trace(300.0, night_rps=1.0, peak_rps=4.0, rng=random.Random(5))
    arrivals = sim.make_arrivals(trace, seed=5)
    assert arrivals == sim.make_arrivals(trace, seed=5) and sum(map(len, arrivals)) > 300
    tokens = [r.tokens for step in arrivals for r in step]
    spec = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=4)
    first = sim.simulate(sim.Ours(spec), trace, MODEL, startup=30.0, seed=5, arrivals=arrivals)
    again = sim.simulate(sim.Ours(spec), trace, MODEL, startup=30.0, seed=5, arrivals=arrivals)
    assert [r.tokens for step in arrivals for r in step] == tokens  # the templates are not consumed
    assert (first.requests, first.slo_attainment, first.replica_seconds) == (
        again.requests, again.slo_attainment, again.replica_seconds)
    assert first.requests == len(tokens)


def test_the_oracle_orders_replicas_one_start_up_ahead_of_the_work_and_drains_the_backlog():
    full_rate = MODEL.max_batch / MODEL.step_seconds(MODEL.max_batch)  # tokens/s of one replica at full batch
    arrivals = [[] for _ in range(240)]  # 120 s in 0.5 s steps
    # 4 replicas' worth of work arrives in the 5 s bin starting at t = 80
    arrivals[162] = [sim.Request(arrival=81.0, tokens=4 * 5 * full_rate / 40) for _ in range(40)]
    oracle = sim.Clairvoyant(arrivals, MODEL, startup=30.0, min_replicas=1, max_replicas=8, utilization=1.0)
    assert oracle.maybe_decide(30.0, 1, [], None) == 1  # the work is more than one start-up away
    assert oracle.maybe_decide(45.0, 1, [], None) == 4  # ordered now, ready at 75 s
    assert oracle.maybe_decide(84.0, 4, [], None) == 4
    assert oracle.maybe_decide(90.0, 4, [], None) == 1  # nothing left ahead
    # a queue of two replicas' worth over the 10 s drain time
    backlog = ready_replicas(2, waiting=0)
    for r in backlog:
        r.queue.extend(sim.Request(arrival=0.0, tokens=10 * full_rate / 4) for _ in range(4))
    assert oracle.maybe_decide(90.0, 4, backlog, None) == 2
    tight = sim.Clairvoyant(arrivals, MODEL, startup=30.0, min_replicas=1, max_replicas=3, utilization=1.0)
    assert tight.maybe_decide(45.0, 1, [], None) == 3  # never above the ceiling


def test_no_policy_under_the_ceiling_beats_every_replica_warm_and_the_oracle_gets_close_for_less():
    # a 2.5x burst on the peak needs ~3.5 of the 4 replicas
    trace = sim.Trace(900.0, night_rps=1.0, peak_rps=4.5, bursts=[(300.0, 120.0, 2.5)])
    arrivals = sim.make_arrivals(trace, seed=7)

    def run(policy, routing="load-aware", warm=1):
        return sim.simulate(policy, trace, MODEL, 30.0, 7, routing=routing, arrivals=arrivals, min_replicas=warm)
    bound = run(sim.AlwaysMax(4), warm=4)
    assert bound.replica_seconds == 4 * 900.0
    tuned = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=4, **sim.TUNED)
    for policy in (sim.Ours(tuned), sim.KedaThreshold(1, 4)):
        assert run(policy).slo_attainment <= bound.slo_attainment
    oracle = run(sim.Clairvoyant(arrivals, MODEL, 30.0, 1, 4))
    assert bound.slo_attainment - 0.005 <= oracle.slo_attainment <= bound.slo_attainment
    assert oracle.replica_seconds < 0.8 * bound.replica_seconds
    # one fleet-wide queue (ideal routing) does better than per-replica queues, and random routing worse
    assert run(sim.AlwaysMax(4), "pooled", 4).slo_attainment > bound.slo_attainment > run(
        sim.AlwaysMax(4), "random", 4).slo_attainment


def test_the_counting_bound_caps_on_time_starts_by_the_fleet_throughput():
    full_rate = MODEL.max_batch / MODEL.step_seconds(MODEL.max_batch)
    # 1000 requests of one replica-second of work each, all at once: one replica at most 32 running plus
    # the ones its throughput finishes within the 2 s SLO
    arrivals = [[sim.Request(arrival=0.0, tokens=full_rate) for _ in range(1000)]]
    assert sim.on_time_bound(arrivals, MODEL, ceiling=1) == pytest.approx((32 + 2) / 1000)
    assert sim.on_time_bound(arrivals, MODEL, ceiling=32) == 1.0  # 1024 slots


def test_pooled_routing_fills_any_free_slot_from_one_fleet_queue():
    cluster = sim.Cluster(MODEL, startup_seconds=0.0, rng=random.Random(0), routing="pooled")
    cluster.replicas = ready_replicas(2, running=31)
    waits: list[float] = []
    for _ in range(3):
        cluster.route(1.0, sim.Request(arrival=0.5, tokens=10))
    cluster.step(1.0, 0.0, waits)
    assert [len(r.running) for r in cluster.replicas] == [32, 32] and len(cluster.central) == 1
    assert waits == [0.5, 0.5] and not any(r.queue for r in cluster.replicas)


def test_the_tuned_setting_is_a_valid_spec_autoscaling():
    camel = {"intervalSeconds": 5, "targetKvCacheUsage": 0.33, "maxScaleUpStep": 16,
             "scaleDownStabilizationSeconds": 30}
    parsed = parse_autoscaling({"enabled": True, "minReplicas": 1, "maxReplicas": 16, **camel})
    assert parsed == AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=16, **sim.TUNED)
