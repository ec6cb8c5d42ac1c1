"""OpenTelemetry traces (TGI's --otlp-endpoint / --otlp-service-name): one trace per request.

A request's spans are written once it ends, from the timings its record already keeps, so tracing adds
nothing to the hot path and nothing at all when it is off:

    <route> (server span: total_time, validation_time, queue_time, inference_time, time_per_token, ...)
      ├─ validate   arrival -> validated (tokenized, limits checked)
      ├─ queue      waiting for a batch slot and KV blocks
      ├─ prefill    first scheduled -> first token
      └─ decode     first token -> end

A caller's W3C `traceparent` header makes the route's span its child. The attribute names are TGI's
(its router's `generate` span fields); durations are written as TGI writes them (`12.5ms`).
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_tracer = None
_provider = None


@dataclass(slots=True)
class RequestTimes:
    """Instants of one request on time.perf_counter()'s clock; None where the request never got there."""

    start: float
    end: float
    validated: float | None = None
    queue_s: float = 0.0
    first_token: float | None = None
    num_generated_tokens: int = 0
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)


def configure_tracing(endpoint: str, service_name: str = "genserve") -> None:
    """Export spans in batches over OTLP/HTTP to `endpoint` (a collector's base URL or its /v1/traces URL)."""
    global _tracer, _provider
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    _provider, _tracer = provider, provider.get_tracer("genserve")
    atexit.register(provider.shutdown)  # the last batch is sent before the process exits
    logger.info("tracing: OTLP/HTTP to %s as %s", url, service_name)


def tracing_enabled() -> bool:
    return _tracer is not None


def flush_traces(timeout_s: float = 10.0) -> bool:
    return _provider.force_flush(int(timeout_s * 1000)) if _provider is not None else True


def shutdown_tracing() -> None:
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def duration_text(seconds: float) -> str:
    """A duration as TGI's router writes it (Rust's Debug of a Duration): 1.5s, 12.25ms, 830µs."""
    if seconds >= 1:
        return f"{seconds:.6g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.6g}ms"
    return f"{seconds * 1e6:.6g}µs"


def trace_request(route: str, headers: Mapping[str, str], times: RequestTimes) -> None:
    """Write the spans of one finished request (a no-op unless tracing is configured)."""
    if _tracer is None:
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(carrier={k.lower(): v for k, v in headers.items()})
    to_ns = _clock_offset_ns()
    validated = times.validated if times.validated is not None else times.end
    scheduled = min(validated + times.queue_s, times.end)
    first = min(times.first_token, times.end) if times.first_token is not None else None
    inference = max(times.end - scheduled, 0.0)
    attrs = {
        "total_time": duration_text(times.end - times.start),
        "validation_time": duration_text(validated - times.start),
        "queue_time": duration_text(times.queue_s),
        "inference_time": duration_text(inference),
        "time_per_token": duration_text(inference / times.num_generated_tokens if times.num_generated_tokens else 0),
        **times.attributes,
    }
    root = _tracer.start_span(route, context=parent, kind=SpanKind.SERVER, start_time=to_ns(times.start),
                              attributes=attrs)
    if "error" in times.attributes:
        root.set_status(Status(StatusCode.ERROR, str(times.attributes["error"])))
    context = set_span_in_context(root)
    phases = [("validate", times.start, validated)]
    if times.validated is not None:
        phases.append(("queue", validated, scheduled))
        if first is not None:
            phases += [("prefill", scheduled, first), ("decode", first, times.end)]
        else:
            phases.append(("prefill", scheduled, times.end))
    for name, begin, end in phases:
        span = _tracer.start_span(name, context=context, start_time=to_ns(begin))
        span.end(end_time=to_ns(max(end, begin)))
    root.end(end_time=to_ns(times.end))


def _clock_offset_ns():
    """perf_counter instants -> epoch nanoseconds (spans are written after the fact)."""
    offset = time.time_ns() - int(time.perf_counter() * 1e9)
    return lambda t: offset + int(t * 1e9)
