"""Discrete-time simulation of one TextGenerationService under a bursty day, comparing three autoscalers:

- ours:  genserve.operator.autoscaler.decide (the operator's own code), scraping pods every intervalSeconds;
- keda:  KEDA's `num_requests_waiting > 5` trigger: an HPA on the external metric (AverageValue 5) fed by a
         Prometheus scrape every 15 s, HPA sync every 15 s, default HPA behaviour (scale-down window 300 s);
- hpa-cpu: an HPA on CPU utilization (target 80 %), metrics-server resolution 15 s, same behaviour.

Replicas decode with continuous batching: up to `max_batch` running requests, every running request gets one
token per step, and the step time grows with the batch as measured on the real server
(benchmarks/results/autoscale_server_figures.json, written by autoscale_measure.py). Requests are routed at
random to ready replicas (kube-proxy), or load-aware as the Gateway API inference extension's endpoint picker
does (`pick_endpoint`: shortest queue, most free KV), and wait in that replica's queue. A new replica serves after the start-up
delay; a removed one stops receiving requests and drains. Queue wait is arrival to first batch slot.

    python benchmarks/autoscale_sim.py --measure  # first re-measure the server figures (starts genserve serve)
    python benchmarks/autoscale_sim.py            # 16 and 32 replica ceilings, bounds (autoscale_sim_oracle.py),
                                                  # table + plot into benchmarks/results/ (--cold-start: 120 s too)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from autoscale_sim_baselines import HpaCpu, KedaThreshold
from autoscale_sim_oracle import AlwaysMax, Clairvoyant, on_time_bound
from autoscale_sim_report import write_outputs

from genserve.operator.autoscaler import Sample, ScalerState, decide
from genserve.operator.spec import AutoscalingSpec

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = RESULTS / "autoscale_server_figures.json"
POD_START_SECONDS = 10.0  # scheduling + container start with the image cached (assumed, not measured here)


@dataclass(slots=True)
class ServerModel:
    step_points: list[tuple[int, float]]  # (batch, seconds per decode step), measured
    ready_seconds: float
    max_batch: int = 32

    def step_seconds(self, batch: int) -> float:
        pts = self.step_points
        if batch <= pts[0][0]:
            return pts[0][1]
        for (b0, s0), (b1, s1) in zip(pts, pts[1:], strict=False):
            if batch <= b1:
                return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)
        (b0, s0), (b1, s1) = pts[-2], pts[-1]
        return s1 + (s1 - s0) * (batch - b1) / (b1 - b0)

    @classmethod
    def load(cls, path: Path = FIGURES) -> ServerModel:
        figures = json.loads(path.read_text())
        points = sorted((b["batch"], b["step_seconds"]) for b in figures["batches"])
        return cls(step_points=points, ready_seconds=figures["server_ready_seconds"])


@dataclass(slots=True)
class Request:
    arrival: float
    tokens: float
    started: float | None = None


@dataclass(slots=True)
class Replica:
    created: float
    ready_at: float
    queue: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    draining: bool = False
    busy_seconds: float = 0.0  # for the CPU model, reset at each metrics window
    tokens_done: float = 0.0

    def is_ready(self, now: float) -> bool:
        return now >= self.ready_at and not self.draining


@dataclass(slots=True)
class Trace:
    """Arrival rate over the day: a ramp from night to a midday peak, with random bursts on top."""
    seconds: float
    night_rps: float
    peak_rps: float
    bursts: list[tuple[float, float, float]]  # (start, duration, multiplier)

    def rate(self, t: float) -> float:
        base = self.night_rps + (self.peak_rps - self.night_rps) * math.sin(math.pi * t / self.seconds) ** 2
        for start, duration, mult in self.bursts:
            if start <= t < start + duration:
                base *= mult
        return base


def make_trace(seconds: float, night_rps: float, peak_rps: float, rng: random.Random) -> Trace:
    bursts, t = [], rng.expovariate(1 / 900)
    while t < seconds:
        bursts.append((t, rng.uniform(60, 240), rng.uniform(1.8, 3.0)))
        t += rng.expovariate(1 / 900)
    return Trace(seconds, night_rps, peak_rps, bursts)


class Ours:
    name = "ours"

    def __init__(self, spec: AutoscalingSpec):
        self.spec, self.state, self.next_at = spec, ScalerState(), 0.0
        self.interval = spec.interval_seconds

    def maybe_decide(self, now: float, current: int, replicas: list[Replica], cluster: Cluster) -> int:
        if now < self.next_at:
            return current
        self.next_at = now + self.interval
        # KV-cache usage ~ share of the batch in use: the batch is full when the KV cache is (max_batch stands for
        # the KV capacity in requests), which is what genserve_kv_cache_usage_ratio reports
        samples = [Sample(waiting=len(r.queue), running=len(r.running),
                          kv_cache_usage=len(r.running) / cluster.model.max_batch)
                   for r in replicas if r.is_ready(now)]
        return decide(samples, 0, current, self.spec, self.state, now).desired


@dataclass(slots=True)
class Result:
    policy: str
    requests: int
    slo_attainment: float
    p50_wait: float
    p99_wait: float
    replica_seconds: float
    mean_replicas: float
    max_replicas: int
    timeline: list[tuple[float, int, float]]  # (t, replicas incl. starting, arrival rate)


class Cluster:
    def __init__(self, model: ServerModel, startup_seconds: float, rng: random.Random, routing: str = "random"):
        self.model, self.startup, self.rng, self.routing = model, startup_seconds, rng, routing
        self.replicas: list[Replica] = []
        self.central: deque = deque()  # routing "pooled": one queue for the whole fleet (ideal routing)

    def scale_to(self, now: float, desired: int) -> None:
        live = [r for r in self.replicas if not r.draining]
        for _ in range(desired - len(live)):
            self.replicas.append(Replica(created=now, ready_at=now + self.startup))
        excess = len(live) - desired
        # like a ReplicaSet: not-ready pods go first, then the newest
        for r in sorted(live, key=lambda r: (r.ready_at <= now, r.created), reverse=False)[:max(excess, 0)]:
            r.draining = True

    def route(self, now: float, request: Request) -> None:
        if self.routing == "pooled":
            self.central.append(request)
            return
        ready = [r for r in self.replicas if r.is_ready(now)]
        if not ready:  # nothing ready yet: the request waits at the oldest starting replica
            ready = sorted((r for r in self.replicas if not r.draining), key=lambda r: r.ready_at)[:1]
        if self.routing == "load-aware" and len(ready) > 1:
            ready = pick_endpoint(ready, self.model.max_batch)
        self.rng.choice(ready).queue.append(request)

    def step(self, now: float, dt: float, waits: list[float]) -> None:
        if self.central:
            self.admit_pooled(now, waits)
        for r in self.replicas:
            if now < r.ready_at:
                continue
            while r.queue and len(r.running) < self.model.max_batch:
                request = r.queue.popleft()
                request.started = now
                waits.append(now - request.arrival)
                r.running.append(request)
            if not r.running:
                continue
            tokens = dt / self.model.step_seconds(len(r.running))
            r.busy_seconds += dt
            r.tokens_done += tokens * len(r.running)
            for request in r.running:
                request.tokens -= tokens
            r.running = [q for q in r.running if q.tokens > 0]
        self.replicas = [r for r in self.replicas if not (r.draining and not r.queue and not r.running)]


    def admit_pooled(self, now: float, waits: list[float]) -> None:
        # the head of the fleet's queue takes any free batch slot, on the replica with the smallest batch
        ready = [r for r in self.replicas if r.is_ready(now)]
        while self.central and ready:
            r = min(ready, key=lambda r: len(r.running))
            if len(r.running) >= self.model.max_batch:
                return
            request = self.central.popleft()
            request.started = now
            waits.append(now - request.arrival)
            r.running.append(request)


def pick_endpoint(ready: list[Replica], max_batch: int) -> list[Replica]:
    """The Gateway API inference extension's endpoint picker with its default scorers, equal weights: the
    queue scorer (fewest waiting, scaled over the candidates' range) plus the KV-cache scorer (most free KV;
    KV usage ~ running / max_batch here). The best-scored replicas; ties are broken at random."""
    queues = [len(r.queue) for r in ready]
    low, high = min(queues), max(queues)
    span = (high - low) or 1

    def score(r: Replica) -> float:
        return (1 - (len(r.queue) - low) / span) + (1 - min(1.0, len(r.running) / max_batch))
    scores = [score(r) for r in ready]
    best = max(scores)
    return [r for r, s in zip(ready, scores, strict=True) if s >= best - 1e-12]


def make_arrivals(trace: Trace, seed: int, dt: float = 0.5, mean_tokens: float = 64.0) -> list[list[Request]]:
    """The day's requests, one list per simulation step: Poisson counts, log-normal output lengths. Drawn up
    front so that every policy (and the clairvoyant oracle) sees the same requests."""
    rng, steps, t = random.Random(seed), [], 0.0
    while t < trace.seconds:
        step = []
        for _ in range(_poisson(rng, trace.rate(t) * dt)):
            tokens = min(512.0, max(8.0, rng.lognormvariate(math.log(mean_tokens) - 0.18, 0.6)))
            step.append(Request(arrival=t - rng.uniform(0, dt), tokens=tokens))  # arrived since the last step
        steps.append(step)
        t += dt
    return steps


def simulate(policy, trace: Trace, model: ServerModel, startup: float, seed: int, dt: float = 0.5,
             min_replicas: int = 1, slo_seconds: float = 2.0, mean_tokens: float = 64.0,
             routing: str = "random", arrivals: list[list[Request]] | None = None) -> Result:
    if arrivals is None:
        arrivals = make_arrivals(trace, seed, dt, mean_tokens)
    cluster = Cluster(model, startup, random.Random(seed + 1), routing)
    cluster.scale_to(0.0, min_replicas)
    for r in cluster.replicas:
        r.ready_at = 0.0  # the day starts with warm replicas
    waits: list[float] = []
    pending: list[Request] = []
    replica_seconds, timeline, current, t = 0.0, [], min_replicas, 0.0
    for step in arrivals:
        rate = trace.rate(t)
        for template in step:  # a fresh copy: the same arrivals serve every policy
            request = Request(arrival=template.arrival, tokens=template.tokens)
            pending.append(request)
            cluster.route(t, request)
        cluster.step(t, dt, waits)
        if isinstance(policy, KedaThreshold):
            policy.observe(t, cluster.replicas)
        desired = policy.maybe_decide(t, current, cluster.replicas, cluster)
        if desired != current:
            cluster.scale_to(t, desired)
            current = desired
        replica_seconds += len(cluster.replicas) * dt
        if int(t / dt) % int(30 / dt) == 0:
            timeline.append((round(t, 1), len(cluster.replicas), round(rate, 3)))
        t += dt
    # requests still queued at the end count with their wait so far
    waits += [trace.seconds - q.arrival for q in pending if q.started is None]
    waits.sort()
    n = len(waits)
    return Result(policy=policy.name, requests=n, slo_attainment=sum(w <= slo_seconds for w in waits) / n,
                  p50_wait=waits[n // 2], p99_wait=waits[min(n - 1, int(0.99 * n))],
                  replica_seconds=replica_seconds, mean_replicas=replica_seconds / trace.seconds,
                  max_replicas=max(p for _, p, _ in timeline), timeline=timeline)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    k, p, threshold = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p <= threshold:
            return k
        k += 1


# a faster, roomier setting of the same policy: 5 s ticks, KV target 0.33 (3x burst headroom), big
# up-steps, 30 s down-window (the headroom is paid for by shedding burst replicas sooner)
TUNED = {"interval_seconds": 5, "target_kv_cache_usage": 0.33, "max_scale_up_step": 16,
         "scale_down_stabilization_seconds": 30}
ROUTINGS = ("random", "load-aware")
ORACLE_UTILIZATION = 0.9  # the clairvoyant scaler sizes for 90 % of full-batch throughput


def day(seed: int, hours: float, model: ServerModel) -> tuple[Trace, list[list[Request]]]:
    capacity_rps = model.max_batch / (64.0 * model.step_seconds(model.max_batch))
    trace = make_trace(hours * 3600, night_rps=0.5 * capacity_rps, peak_rps=5 * capacity_rps, rng=random.Random(seed))
    return trace, make_arrivals(trace, seed)


def summarize(results: list[Result]) -> dict:
    n = len(results)
    return {"slo_attainment": sum(r.slo_attainment for r in results) / n,
            "p99_wait_seconds": sum(r.p99_wait for r in results) / n,
            "p50_wait_seconds": sum(r.p50_wait for r in results) / n,
            "replica_seconds": sum(r.replica_seconds for r in results) / n,
            "mean_replicas": sum(r.mean_replicas for r in results) / n,
            "requests": sum(r.requests for r in results) // n,
            "per_seed_slo_attainment": [round(r.slo_attainment, 4) for r in results],
            "per_seed_p99_wait_seconds": [round(r.p99_wait, 1) for r in results]}


def run_seed(startup: float, model: ServerModel, seed: int, hours: float, max_replicas: int) -> dict[str, Result]:
    """Every policy under both routings on one seed's day (one task of the process pool)."""
    spec = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=max_replicas)
    tuned = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=max_replicas, **TUNED)
    trace, arrivals = day(seed, hours, model)
    results = {}
    for routing in ROUTINGS:
        tuned_policy = Ours(tuned)
        tuned_policy.name = "ours-tuned"
        oracle = Clairvoyant(arrivals, model, startup, 1, max_replicas, utilization=ORACLE_UTILIZATION)
        for policy in (Ours(spec), tuned_policy, KedaThreshold(1, max_replicas), HpaCpu(1, max_replicas),
                       oracle, AlwaysMax(max_replicas)):
            warm = max_replicas if isinstance(policy, AlwaysMax) else 1
            results[f"{policy.name} / {routing}"] = simulate(policy, trace, model, startup, seed, routing=routing,
                                                             arrivals=arrivals, min_replicas=warm)
    return results


def run_scenario(pool: Executor, name: str, startup: float, model: ServerModel, seeds: list[int], hours: float,
                 max_replicas: int) -> Callable[[], dict]:
    """Submits the scenario's seeds; the returned function collects them into the scenario's summary."""
    jobs = [pool.submit(run_seed, startup, model, seed, hours, max_replicas) for seed in seeds]

    def collect() -> dict:
        per_policy: dict[str, list[Result]] = {}
        for job in jobs:
            for policy, result in job.result().items():
                per_policy.setdefault(policy, []).append(result)
        return {"scenario": name, "startup_seconds": startup, "max_replicas": max_replicas, "seeds": seeds,
                "hours": hours, "replica_capacity_rps": model.max_batch / (64.0 * model.step_seconds(model.max_batch)),
                "policies": {p: summarize(rs) for p, rs in per_policy.items()},
                "timeline": {p: rs[0].timeline for p, rs in per_policy.items()}}
    return collect


# the scenarios hold the 16 and 32 bounds with load-aware and random routing
SWEEP = (("pooled", 16), ("load-aware", 20), ("load-aware", 24), ("load-aware", 28))
COUNTING_CEILINGS = (16, 20, 24)


def sweep_seed(startup: float, model: ServerModel, seed: int, hours: float) -> dict:
    trace, arrivals = day(seed, hours, model)
    rows = {f"{hi} / {routing}": simulate(AlwaysMax(hi), trace, model, startup, seed, routing=routing,
                                          arrivals=arrivals, min_replicas=hi) for routing, hi in SWEEP}
    return {"rows": rows, "counting": {hi: round(on_time_bound(arrivals, model, hi), 4) for hi in COUNTING_CEILINGS}}


def ceiling_sweep(pool: Executor, startup: float, model: ServerModel, seeds: list[int],
                  hours: float) -> Callable[[], dict]:
    """The capacity bound (every replica of the ceiling warm all day) for a range of ceilings: the smallest
    ceiling under which the bar can be met at all, whatever the policy; and the counting bound beside it."""
    jobs = [pool.submit(sweep_seed, startup, model, seed, hours) for seed in seeds]

    def collect() -> dict:
        done = [job.result() for job in jobs]
        return {"startup_seconds": startup, "seeds": seeds, "hours": hours,
                "ceilings": {row: summarize([d["rows"][row] for d in done]) for row in done[0]["rows"]},
                "counting_bound": {hi: [d["counting"][hi] for d in done] for hi in COUNTING_CEILINGS}}
    return collect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--max-replicas", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2, help="seeds simulated in parallel processes")
    parser.add_argument("--cold-start", action="store_true", help="also the 120 s start-up scenario")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--measure", action="store_true", help="re-measure the server figures first")
    parser.add_argument("--genserve", default=str(Path(sys.executable).with_name("genserve")))
    args = parser.parse_args(argv)
    if args.measure:
        from autoscale_sim_measure import measure_server

        print(json.dumps(measure_server(args.genserve, FIGURES), indent=2))
    model = ServerModel.load()
    seeds = list(range(1, args.seeds + 1))
    measured = model.ready_seconds + POD_START_SECONDS
    # at the 16-replica ceiling the capacity bound misses the bar (overlapping bursts on the midday peak need
    # more than 16 replicas), so the same day also runs with room to grow
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        pending = [run_scenario(pool, "measured start-up", measured, model, seeds, args.hours, args.max_replicas),
                   run_scenario(pool, "measured start-up, 2x ceiling", measured, model, seeds, args.hours,
                                2 * args.max_replicas)]
        if args.cold_start:
            pending.append(run_scenario(pool, "GPU-like cold start", 120.0, model, seeds, args.hours,
                                        args.max_replicas))
        sweep = ceiling_sweep(pool, measured, model, seeds, args.hours)
        scenarios, sweep = [collect() for collect in pending], sweep()
    write_outputs(scenarios, sweep, model, args.out, wall_seconds=time.perf_counter() - started)
    print((args.out / "autoscale_results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
