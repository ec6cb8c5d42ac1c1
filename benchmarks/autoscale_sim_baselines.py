"""The simulation's baselines: the HPA algorithm with default behaviour, fed by KEDA's `num_requests_waiting`
threshold or by CPU utilization (benchmarks/autoscale_sim.py runs them beside the operator's policy)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoscale_sim import Cluster, Replica


class Hpa:
    """The HPA algorithm with default behaviour: tolerance 0.1, up at most max(100 %, 4 pods) per 15 s,
    down to the highest recommendation of the last 300 s."""
    sync_seconds, tolerance, down_window = 15.0, 0.1, 300.0

    def __init__(self, name: str, min_replicas: int, max_replicas: int):
        self.name, self.lo, self.hi = name, min_replicas, max_replicas
        self.next_at, self.recommendations = 0.0, []

    def raw(self, now: float, current: int, replicas: list[Replica], cluster: Cluster) -> int | None:
        raise NotImplementedError

    def maybe_decide(self, now: float, current: int, replicas: list[Replica], cluster: Cluster) -> int:
        if now < self.next_at:
            return current
        self.next_at = now + self.sync_seconds
        raw = self.raw(now, current, replicas, cluster)
        if raw is None:
            return current
        raw = min(max(raw, self.lo), self.hi)
        self.recommendations = [(t, r) for t, r in self.recommendations if now - t <= self.down_window]
        self.recommendations.append((now, raw))
        if raw > current:
            return min(raw, max(2 * current, current + 4), self.hi)
        return min(current, max(r for _, r in self.recommendations))


class KedaThreshold(Hpa):
    """External metric num_requests_waiting, AverageValue target 5, read from a Prometheus scraped every 15 s."""
    target, scrape_seconds = 5.0, 15.0

    def __init__(self, min_replicas: int, max_replicas: int):
        super().__init__("keda", min_replicas, max_replicas)
        self.scraped, self.scrape_at = 0.0, 0.0

    def observe(self, now: float, replicas: list[Replica]) -> None:
        if now >= self.scrape_at:
            self.scrape_at = now + self.scrape_seconds
            self.scraped = sum(len(r.queue) for r in replicas if now >= r.ready_at)

    def raw(self, now: float, current: int, replicas: list[Replica], cluster: Cluster) -> int | None:
        ratio = self.scraped / (self.target * current)
        if abs(ratio - 1) <= self.tolerance:
            return current
        return math.ceil(self.scraped / self.target)


class HpaCpu(Hpa):
    """CPU utilization of a GPU serving pod (assumed model, see docs/operator.md): the engine loop keeps one
    core busy while any request runs, plus tokenizer/detokenizer work per generated token; request 2 cores."""
    target, cpu_request, loop_cores, core_seconds_per_token = 0.8, 2.0, 1.0, 0.0005

    def __init__(self, min_replicas: int, max_replicas: int):
        super().__init__("hpa-cpu", min_replicas, max_replicas)
        self.window_start = 0.0

    def raw(self, now: float, current: int, replicas: list[Replica], cluster: Cluster) -> int | None:
        window = max(now - self.window_start, 1e-9)
        self.window_start = now
        ready = [r for r in replicas if r.is_ready(now)]
        utils = []
        for r in replicas:
            used = self.loop_cores * r.busy_seconds + self.core_seconds_per_token * r.tokens_done
            if r in ready:
                utils.append(used / window / self.cpu_request)
            r.busy_seconds = r.tokens_done = 0.0
        if not utils:
            return None
        ratio = (sum(utils) / len(utils)) / self.target
        if abs(ratio - 1) <= self.tolerance:
            return current
        return math.ceil(ratio * len(ready))
