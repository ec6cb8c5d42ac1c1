"""Bounds for the autoscaling simulation: what any policy could reach under the same ceiling and start-up.

- `AlwaysMax`: every replica of the ceiling warm from the first second. No scaler limited by the ceiling has
  more serving capacity at any instant, so its SLO attainment bounds every policy's (cost aside) for the
  first-come-first-served admission genserve's scheduler does. Not a theorem: under overload, per-replica
  queues can reorder requests so that a smaller fleet scores ~0.1 point more. `on_time_bound` below is a
  looser bound that holds for any admission order.
- `Clairvoyant`: knows every future request (its arrival and output length) and is limited only by the
  start-up delay and the ceiling: it orders a replica one start-up ahead of the moment the future work needs
  it and keeps it while work within the next start-up needs it. What a perfect predictor would spend.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoscale_sim import Cluster, Replica, Request, ServerModel


class AlwaysMax:
    name = "bound: always max"

    def __init__(self, max_replicas: int):
        self.hi = max_replicas

    def maybe_decide(self, now: float, current: int, replicas: list[Replica], cluster: Cluster) -> int:
        return self.hi


class Clairvoyant:
    """desired(t) = ceil(max future need over [t, t + start-up + bin] / utilization) plus the backlog's share,
    within [lo, hi]; need(bin) = output tokens arriving in the bin / (bin x one full replica's tokens/s)."""
    name = "oracle"

    def __init__(self, arrivals: list[list[Request]], model: ServerModel, startup: float, min_replicas: int,
                 max_replicas: int, dt: float = 0.5, utilization: float = 0.8, bin_seconds: float = 5.0,
                 drain_seconds: float = 10.0):
        self.lo, self.hi, self.startup, self.bin = min_replicas, max_replicas, startup, bin_seconds
        self.utilization, self.drain = utilization, drain_seconds
        self.replica_tokens_per_s = model.max_batch / model.step_seconds(model.max_batch)
        bins = int(len(arrivals) * dt / bin_seconds) + 2
        work = [0.0] * bins
        for step in arrivals:
            for r in step:
                work[int(max(r.arrival, 0.0) / bin_seconds)] += r.tokens
        self.need = [w / bin_seconds / self.replica_tokens_per_s for w in work]

    def maybe_decide(self, now: float, current: int, replicas: list[Replica], cluster: Cluster) -> int:
        first = int(now / self.bin)
        last = min(len(self.need), int((now + self.startup) / self.bin) + 2)
        ahead = max(self.need[first:last], default=0.0)
        # work already queued (its remaining tokens) must also drain within drain_seconds
        backlog = sum(q.tokens for r in replicas for q in r.queue)
        needed = ahead / self.utilization + backlog / (self.drain * self.replica_tokens_per_s)
        return min(max(math.ceil(needed - 1e-9), self.lo), self.hi)


def on_time_bound(arrivals: list[list[Request]], model: ServerModel, ceiling: int, slo_seconds: float = 2.0,
                  probe_seconds: float = 5.0) -> float:
    """The largest share of requests that any scaler, router and scheduling order could start within the SLO
    with at most `ceiling` replicas serving, each at most at full-batch throughput (a counting argument, no
    simulation; start-up delays ignored, which only raises the bound).

    Take an overload period [t1, t2] (the fleet's full throughput C cannot keep up from t1 on). The requests
    arriving in it that start by t2 + SLO were either finished by then, using at most C x (t2 + SLO - t1) tokens
    of work, or are among the at most ceiling x max_batch still running. So at most max_batch x ceiling + j of
    them start on time, where j is how many of the smallest fit into that work. Late requests of disjoint
    periods add up."""
    capacity = ceiling * model.max_batch / model.step_seconds(model.max_batch)  # tokens/s
    slots = ceiling * model.max_batch
    requests = sorted((r for step in arrivals for r in step), key=lambda r: r.arrival)
    late, period, backlog, last = 0, [], 0.0, 0.0

    def close(period: list[Request]) -> int:
        if len(period) <= slots:
            return 0
        worst = 0
        t1, probes = period[0].arrival, int((period[-1].arrival - period[0].arrival) / probe_seconds) + 1
        for k in range(1, probes + 1):
            t2 = min(t1 + k * probe_seconds, period[-1].arrival)
            tokens = sorted(r.tokens for r in period if r.arrival <= t2)
            budget, fit = capacity * (t2 + slo_seconds - t1), 0
            for x in tokens:
                if budget < x:
                    break
                budget -= x
                fit += 1
            worst = max(worst, len(tokens) - min(len(tokens), fit + slots))
        return worst

    for r in requests:
        backlog = max(0.0, backlog - capacity * (r.arrival - last))
        last = r.arrival
        if backlog == 0.0:
            late += close(period)
            period = []
        period.append(r)
        backlog += r.tokens
    late += close(period)
    return 1.0 - late / max(1, len(requests))
