"""The autoscaler's latest decision per service, as gauges on the operator's own /metrics.

They carry what the model servers cannot know (the replica bounds and the target), so an alert can
tell "pinned at maxReplicas with a queue above target" from "scaled up and keeping up":

    genserve_autoscaler_desired_replicas >= genserve_autoscaler_max_replicas
    and genserve_autoscaler_queue_depth > genserve_autoscaler_target_queue_depth * genserve_autoscaler_desired_replicas

The series are labelled `namespace` and `service` (the TextGenerationService), so the scrape must
honour the exposed labels (the chart's operator PodMonitor sets honorLabels).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from genserve.operator.autoscaler import Decision
from genserve.operator.spec import AutoscalingSpec, SpecError, parse_spec

LABELS = ("namespace", "service")


class AutoscalerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry)

        self.desired = gauge("genserve_autoscaler_desired_replicas", "Replicas the autoscaler last asked for")
        self.min = gauge("genserve_autoscaler_min_replicas", "spec.autoscaling.minReplicas")
        self.max = gauge("genserve_autoscaler_max_replicas", "spec.autoscaling.maxReplicas")
        self.target = gauge("genserve_autoscaler_target_queue_depth",
                            "spec.autoscaling.targetQueueDepth: waiting requests per replica the autoscaler aims at")
        self.queue = gauge("genserve_autoscaler_queue_depth",
                           "Requests waiting over all ready replicas at the last decision")
        self.running = gauge("genserve_autoscaler_running_requests",
                             "Requests running over all ready replicas at the last decision")

    def observe(self, body: dict[str, Any], decision: Decision | None, default_image: str) -> None:
        """After an autoscaler tick: record its decision, or drop the series when there was none."""
        meta = body["metadata"]
        try:
            policy = parse_spec(dict(body.get("spec") or {}), default_image).autoscaling
        except SpecError:
            policy = None
        if decision is None or policy is None or not policy.enabled:
            self.forget(meta["namespace"], meta["name"])
        else:
            self.record(meta["namespace"], meta["name"], policy, decision)

    def record(self, namespace: str, service: str, policy: AutoscalingSpec, decision: Decision) -> None:
        labels = (namespace, service)
        self.desired.labels(*labels).set(decision.desired)
        self.min.labels(*labels).set(policy.min_replicas)
        self.max.labels(*labels).set(policy.max_replicas)
        self.target.labels(*labels).set(policy.target_queue_depth)
        # no metrics this tick: drop the load series rather than keep a stale queue alive
        for gauge, value in ((self.queue, decision.queue_depth), (self.running, decision.running)):
            if value is None:
                _remove(gauge, labels)
            else:
                gauge.labels(*labels).set(value)

    def forget(self, namespace: str, service: str) -> None:
        """The service is gone (or no longer autoscaled): its series go with it."""
        for gauge in (self.desired, self.min, self.max, self.target, self.queue, self.running):
            _remove(gauge, (namespace, service))

    def serve(self, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 (a pod listens on all interfaces)
        start_http_server(port, addr=host, registry=self.registry)


def _remove(gauge: Gauge, labels: tuple[str, str]) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
