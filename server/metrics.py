"""Every Prometheus metric of the server, defined once, in a registry per app.

TGI's names are kept so TGI dashboards and alerts keep working. TGI's exporter writes counters
without a `_total` suffix (`tgi_request_count 3`), which prometheus_client cannot, so those four
families are rendered here. Gauges that mirror engine state are read from `engine.stats()` at
scrape time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# TGI: a geometric series from 0.15 ms to about 3.5 h
DURATION_BUCKETS = tuple(0.0001 * 1.5**k for k in range(1, 36))
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)

# TGI: one bucket per batch size up to 1024
BATCH_SIZE_BUCKETS = tuple(float(n) for n in range(1, 1025))
SKIPPED_BUCKETS = tuple(float(n) for n in range(0, 11))
ACCEPTANCE_BUCKETS = tuple(k / 10 for k in range(0, 11))

TGI_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tgi_request_count": ("Total number of requests", ()),
    "tgi_request_success": ("Number of successful requests", ()),
    "tgi_request_failure": ("Number of failed requests", ("err",)),
    "tgi_batch_inference_count": ("Inference calls per method (prefill or decode)", ("method",)),
    "tgi_batch_inference_success": ("Number of successful inference calls per method (prefill or decode)",
                                    ("method",)),
    # TGI counts a new batch joining a running one; here requests join the running batch in any step
    "tgi_batch_concat": ("Steps where waiting requests joined a running batch", ("reason",)),
}


def _linear(maximum: int, n: int = 100) -> tuple[float, ...]:
    step = max(maximum, n) / n
    return tuple(round(step * (i + 1), 3) for i in range(n))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self, max_input_tokens: int = 4096, max_total_tokens: int = 4096):
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "tgi_request_duration", "Total time spent processing the request", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_validation_duration = Histogram(
            "tgi_request_validation_duration", "Time spent validating the request", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_queue_duration = Histogram(
            "tgi_request_queue_duration", "Time spent in the queue per request", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_inference_duration = Histogram(
            "tgi_request_inference_duration", "Request inference duration", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_mean_time_per_token_duration = Histogram(
            "tgi_request_mean_time_per_token_duration", "Mean time per token per request", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_input_length = Histogram(
            "tgi_request_input_length", "Input token length per request", buckets=_linear(max_input_tokens), registry=r
        )
        self.request_generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens per request", buckets=_linear(max_total_tokens), registry=r
        )
        self.request_max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "Maximum new tokens per request", buckets=_linear(max_total_tokens), registry=r
        )
        self.batch_forward_duration = Histogram(
            "tgi_batch_forward_duration", "Batch forward duration per method (prefill or decode)", ["method"],
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.batch_decode_duration = Histogram(
            "tgi_batch_decode_duration", "Time spent decoding a batch per method (prefill or decode)", ["method"],
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.batch_filter_duration = Histogram(
            "tgi_batch_filter_duration",
            "Time spent filtering batches and sending generated tokens per method (prefill or decode)", ["method"],
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.batch_inference_duration = Histogram(
            "tgi_batch_inference_duration", "Batch inference duration", ["method"],
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.batch_next_size = Histogram(
            "tgi_batch_next_size", "Batch size of the next batch", buckets=BATCH_SIZE_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "genserve_time_to_first_token_seconds", "Time from request arrival to its first generated token",
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.inter_token_latency = Histogram(
            "genserve_inter_token_latency_seconds", "Time between two generated tokens of a request",
            buckets=ITL_BUCKETS, registry=r,
        )
        # speculative decoding (--speculate): TGI's histogram, observed per request at each verification
        self.request_skipped_tokens = Histogram(
            "tgi_request_skipped_tokens", "Speculated tokens kept per request and verification step",
            buckets=SKIPPED_BUCKETS, registry=r,
        )
        self.spec_acceptance = Histogram(
            "genserve_spec_decode_acceptance_ratio", "Fraction of a verification step's draft tokens kept",
            buckets=ACCEPTANCE_BUCKETS, registry=r,
        )
        self.spec_draft_tokens = Counter(
            "genserve_spec_decode_draft_tokens", "Draft tokens verified", registry=r)
        self.spec_accepted_tokens = Counter(
            "genserve_spec_decode_accepted_tokens", "Draft tokens kept", registry=r)
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in TGI_COUNTERS}
        self._counters["tgi_request_count"][()] = 0
        self._counters["tgi_request_success"][()] = 0
        self._engine = None
        r.register(_EngineStateCollector(self))

    def bind_engine(self, engine) -> None:
        self._engine = engine
        engine.step_observers.append(self.observe_step)

    def inc(self, name: str, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            series = self._counters[name]
            series[labels] = series.get(labels, 0) + amount

    def counter_value(self, name: str, *labels: str) -> float:
        with self._lock:
            return self._counters[name].get(labels, 0)

    def observe_step(self, step) -> None:
        """Engine-thread callback after each forward pass."""
        self.batch_forward_duration.labels(step.method).observe(step.duration_s)
        self.batch_filter_duration.labels(step.method).observe(step.filter_s)
        self.batch_decode_duration.labels(step.method).observe(step.decode_s)
        self.batch_inference_duration.labels(step.method).observe(step.duration_s + step.filter_s + step.decode_s)
        self.batch_next_size.observe(step.next_batch_size)
        self.inc("tgi_batch_inference_count", step.method)
        self.inc("tgi_batch_inference_success", step.method)
        if step.joined_running_batch:
            self.inc("tgi_batch_concat", "backpressure")
        for kept, drafted in zip(step.num_accepted, step.num_drafts, strict=True):
            self.request_skipped_tokens.observe(kept)
            self.spec_acceptance.observe(kept / drafted)
            self.spec_draft_tokens.inc(drafted)
            self.spec_accepted_tokens.inc(kept)

    def render(self) -> bytes:
        lines: list[str] = []
        with self._lock:
            for name, (doc, label_names) in TGI_COUNTERS.items():
                lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
                for labels, value in sorted(self._counters[name].items()):
                    label_str = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(label_names, labels, strict=True))
                    lines.append(f"{name}{{{label_str}}} {value:g}" if label_str else f"{name} {value:g}")
        return generate_latest(self.registry) + ("\n".join(lines) + "\n").encode()


class _EngineStateCollector(Collector):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        engine = self.metrics._engine
        if engine is None:
            return
        s = engine.stats()
        block_size = getattr(getattr(engine, "config", None), "block_size", 16)
        gauges = [
            ("tgi_queue_size", "Current queue size", s.num_waiting),
            ("tgi_batch_current_size", "Current batch size", s.num_running),
            ("tgi_batch_current_max_tokens", "Tokens held in the KV cache by the current batch",
             s.num_kv_blocks_used * block_size),
            ("genserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)", s.kv_cache_usage),
            ("genserve_kv_cache_blocks_used", "KV-cache blocks in use", s.num_kv_blocks_used),
            ("genserve_kv_cache_blocks_total", "KV-cache blocks in the pool", s.num_kv_blocks_total),
            ("genserve_num_requests_waiting", "Requests waiting to be scheduled", s.num_waiting),
            ("genserve_num_requests_running", "Requests in the running batch", s.num_running),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("genserve_num_preemptions", "Requests preempted to free KV-cache blocks", s.num_preemptions_total),
            ("genserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.prefix_cache_queries_total),
            ("genserve_prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits_total),
            ("genserve_prompt_tokens", "Prompt tokens processed", s.num_prompt_tokens_total),
            ("genserve_generation_tokens", "Tokens generated", s.num_generation_tokens_total),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        yield from _adapter_metrics(getattr(s, "adapters", None) or {}, getattr(s, "max_loras", 0))


def _adapter_metrics(adapters: dict, max_loras: int) -> Iterable[Metric]:
    """Per LoRA adapter (label `adapter`), and vLLM's lora_requests_info (label values: adapters with running
    / waiting requests, comma-separated; the value is the scrape time, as vLLM sets it)."""
    if not max_loras:
        return
    running = GaugeMetricFamily("genserve_lora_requests_running", "Requests running with the LoRA adapter",
                                labels=["adapter"])
    waiting = GaugeMetricFamily("genserve_lora_requests_waiting", "Requests waiting with the LoRA adapter",
                                labels=["adapter"])
    tokens = CounterMetricFamily("genserve_lora_generation_tokens", "Tokens generated with the LoRA adapter",
                                 labels=["adapter"])
    for name, a in adapters.items():
        running.add_metric([name], a.num_running)
        waiting.add_metric([name], a.num_waiting)
        tokens.add_metric([name], a.num_generation_tokens_total)
    yield from (running, waiting, tokens)
    info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                             labels=["running_lora_adapters", "max_lora", "waiting_lora_adapters"])
    info.add_metric([",".join(n for n, a in adapters.items() if a.num_running), str(max_loras),
                     ",".join(n for n, a in adapters.items() if a.num_waiting)], time.time())
    yield info


def serve_metrics(metrics: Metrics, host: str, port: int) -> None:
    """TGI's --prometheus-port: the same exposition as /metrics on a listener of its own (a daemon thread)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404)
                return
            body = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes are not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="genserve-metrics", daemon=True).start()
