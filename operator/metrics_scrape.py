"""Reads load from each ready pod's /metrics (or from Prometheus) into autoscaler Samples."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from genserve.operator.autoscaler import Sample

# genserve's own gauges first, TGI's names as the fallback
WAITING = ("genserve_num_requests_waiting", "tgi_queue_size")
RUNNING = ("genserve_num_requests_running", "tgi_batch_current_size")
KV_USAGE = ("genserve_kv_cache_usage_ratio",)
# TGI's counter has no _total suffix; prometheus_client's parser adds it to counter samples
REQUESTS = ("tgi_request_count_total", "tgi_request_count")
ACTIVATOR_WAITING = "genserve_activator_requests_waiting"
DEFAULT_PORT = 8080


def parse_metrics(text: str) -> Sample:
    """Sums each gauge over its label sets; raises ValueError when no queue metric is present."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WAITING + RUNNING + KV_USAGE + REQUESTS:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value

    def first(names: tuple[str, ...]) -> float | None:
        return next((values[n] for n in names if n in values), None)

    waiting = first(WAITING)
    if waiting is None:
        raise ValueError(f"none of {', '.join(WAITING)} in the metrics")
    return Sample(waiting=waiting, running=first(RUNNING) or 0.0, kv_cache_usage=first(KV_USAGE),
                  requests_total=first(REQUESTS))


def is_pod_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if pod.get("metadata", {}).get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def metrics_url(pod: dict[str, Any], port_name: str = "http") -> str:
    port = DEFAULT_PORT
    for container in pod.get("spec", {}).get("containers", []):
        for p in container.get("ports") or []:
            if p.get("name") == port_name:
                port = p["containerPort"]
    host = pod["status"]["podIP"]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/metrics"


def scrape(url: str, timeout: float) -> Sample:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_metrics(response.read().decode())


def scrape_pods(pods: list[dict[str, Any]], timeout: float) -> tuple[list[Sample], dict[str, str]]:
    """Samples of the pods that answered, and {pod name: error} for those that did not."""
    if not pods:
        return [], {}
    samples, errors = [], {}
    with ThreadPoolExecutor(max_workers=min(16, len(pods))) as pool:
        futures = {pod["metadata"]["name"]: pool.submit(scrape, metrics_url(pod), timeout) for pod in pods}
        for name, future in futures.items():
            try:
                samples.append(future.result())
            except Exception as e:  # any failure is "no data" for this pod
                errors[name] = f"{type(e).__name__}: {e}"
    return samples, errors


def scrape_activator(pods: list[dict[str, Any]], timeout: float) -> float | None:
    """Requests the ready activator pods hold in total; None when none of them answered."""
    held, answered = 0.0, False
    for pod in pods:
        try:
            with urllib.request.urlopen(metrics_url(pod, "metrics"), timeout=timeout) as response:
                text = response.read().decode()
        except Exception:  # an unreachable activator is "no data", never "nothing held"
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == ACTIVATOR_WAITING:
                    held += sample.value
                    answered = True
    return held if answered else None


def query_prometheus(base_url: str, namespace: str, service: str, pod_names: list[str],
                     timeout: float) -> tuple[list[Sample], list[str]]:
    """Samples of the given (ready) pods from a Prometheus that scrapes our ServiceMonitor, and the pods
    it has no series for: those count as missing data, never as idle replicas."""
    selector = f'namespace="{namespace}",service="{service}"'

    def per_pod(names: tuple[str, ...]) -> dict[str, float]:
        expr = " or ".join(f"sum by (pod) ({n}{{{selector}}})" for n in names)
        url = f"{base_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise ValueError(f"prometheus: {body.get('error', 'query failed')}")
        return {r["metric"].get("pod", ""): float(r["value"][1]) for r in body["data"]["result"]}

    waiting, running, kv = per_pod(WAITING), per_pod(RUNNING), per_pod(KV_USAGE)
    samples = [Sample(waiting=waiting[pod], running=running.get(pod, 0.0), kv_cache_usage=kv.get(pod))
               for pod in sorted(pod_names) if pod in waiting]
    return samples, sorted(pod for pod in pod_names if pod not in waiting)
