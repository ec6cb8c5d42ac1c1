"""vLLM's metric names beside TGI's (`--metrics-compat vllm`), so vLLM dashboards, KEDA triggers and the
Gateway API inference extension's endpoint picker read genserve unchanged.

Names, labels (`model_name`, `engine`), units and buckets follow vLLM v1 (vllm/v1/metrics/loggers.py,
buckets.py). Engine state (queue, batch, KV cache, token counters) is read from `engine.stats()` at
scrape time, like the TGI gauges; per-request histograms are observed when a request ends, and time to
first token and inter-token latency as the tokens arrive (they share genserve's own observations).
`vllm:gpu_cache_usage_perc` and `vllm:time_per_output_token_seconds` are the pre-v1 names older
endpoint pickers and dashboards still query; they carry the same values as their v1 successors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from genserve.server.metrics import Metrics

if TYPE_CHECKING:
    from genserve.server.api.record import RequestRecord

LABELS = ("model_name", "engine")
# vLLM's FinishReason strings; ours are TGI's
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
FINISH_REASON = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to the context length (build_1_2_5_buckets)."""
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return tuple(float(v) for v in out)
            out.append(value)
        exponent += 1


class _Tee:
    """Observes into genserve's histogram and vLLM's at once (the pipeline calls `.observe` once)."""

    def __init__(self, *histograms):
        self.histograms = histograms

    def observe(self, value: float) -> None:
        for h in self.histograms:
            h.observe(value)


class VllmMetrics:
    def __init__(self, metrics: Metrics, model_name: str, max_model_len: int):
        self.metrics = metrics
        self.labels = (model_name, "0")
        r = metrics.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=r).labels(*self.labels)

        tokens = token_buckets(max_model_len)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds (pre-v1 name of the inter-token latency).",
                              ITL_BUCKETS)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.generation_tokens = histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                           tokens)
        self.max_tokens = histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                    tokens)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          (*LABELS, "finished_reason"), registry=r)
        self.success = {reason: success.labels(*self.labels, reason) for reason in FINISHED_REASONS}
        r.register(_VllmEngineStateCollector(metrics, self.labels))

    def observe_finished(self, record: RequestRecord) -> None:
        """A finish observer of the pipeline: every request that reached the engine, ended or aborted."""
        if record.validated is None:  # refused before admission: vLLM never counts those either
            return
        if record.status == 200:
            reason = FINISH_REASON.get(record.finish_reason or "", "stop")
        else:
            reason = "abort" if record.status == 499 else "error"
        self.success[reason].inc()
        t = record.timings()
        self.e2e.observe(t["total"])
        self.queue.observe(t["queue"])
        self.inference.observe(t["inference"])
        self.prompt_tokens.observe(record.num_prompt_tokens)
        self.generation_tokens.observe(record.num_generated_tokens)
        self.max_tokens.observe(record.max_new_tokens)
        if record.first_token is not None:
            scheduled = (record.validated or record.start) + t["queue"]
            self.prefill.observe(max(record.first_token - scheduled, 0.0))
            last = record.last_token or record.first_token
            self.decode.observe(max(last - record.first_token, 0.0))
            if record.num_generated_tokens > 1:
                self.request_tpot.observe((last - record.first_token) / (record.num_generated_tokens - 1))


def enable_vllm_metrics(metrics: Metrics, service, model_name: str, max_model_len: int) -> VllmMetrics:
    """Add vLLM's families to `metrics` and hook them into the pipeline of `service` (a GenerationService)."""
    vllm = VllmMetrics(metrics, model_name, max_model_len)
    metrics.time_to_first_token = _Tee(metrics.time_to_first_token, vllm.ttft)
    metrics.inter_token_latency = _Tee(metrics.inter_token_latency, vllm.itl, vllm.tpot)
    service.finish_observers.append(vllm.observe_finished)
    return vllm


class _VllmEngineStateCollector(Collector):
    def __init__(self, metrics: Metrics, labels: tuple[str, str]):
        self.metrics = metrics
        self.labels = list(labels)

    def collect(self) -> Iterable[Metric]:
        engine = self.metrics._engine
        if engine is None:
            return
        s = engine.stats()
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        families = [
            (gauge, "vllm:num_requests_running", "Number of requests in model execution batches.", s.num_running),
            (gauge, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting),
            (gauge, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage),
            (gauge, "vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage (pre-v1 name).",
             s.kv_cache_usage),
            (counter, "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
             s.num_preemptions_total),
            (counter, "vllm:prompt_tokens", "Number of prefill tokens processed.", s.num_prompt_tokens_total),
            (counter, "vllm:generation_tokens", "Number of generation tokens processed.",
             s.num_generation_tokens_total),
            (counter, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             s.prefix_cache_queries_total),
            (counter, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             s.prefix_cache_hits_total),
        ]
        for kind, name, doc, value in families:
            family = kind(name, doc, labels=LABELS)
            family.add_metric(self.labels, value)
            yield family
