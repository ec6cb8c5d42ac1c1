"""`--metrics-compat vllm`: vLLM's metric names on /metrics of a real server over HTTP, moving with the
requests (queue, batch, KV cache while streams run; counters and histograms as requests end)."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from held_streams import HeldStreams

from genserve.server.cli import build_parser
from genserve.server.metrics_vllm import ITL_BUCKETS, TTFT_BUCKETS, token_buckets

CAP_S = 180


@pytest.fixture(scope="module")
def server(metrics_compat_server):
    """The shared server, idle (the Prometheus module may have left aborted streams draining)."""
    wait_for(lambda: (g := scrape(metrics_compat_server))["tgi_queue_size"] == 0 and g["tgi_batch_current_size"] == 0,
             "an idle server")
    return metrics_compat_server


def scrape(server) -> dict[str, float]:
    """name{labels} -> value, exactly as exposed (labels sorted)."""
    out = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if m:
            labels = ",".join(sorted(f'{k}="{v}"' for k, v in re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
            out[f"{m.group(1)}{{{labels}}}" if labels else m.group(1)] = float(m.group(3))
    return out


def model_name(server) -> str:
    return httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]


def vllm(server, name: str, **extra: str) -> str:
    labels = {"model_name": model_name(server), "engine": "0", **extra}
    return name + "{" + ",".join(sorted(f'{k}="{v}"' for k, v in labels.items())) + "}"


def wait_for(check, what: str):
    deadline = time.monotonic() + CAP_S
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {CAP_S} s: {what}"
        time.sleep(0.2)
    return result


def test_flag_parses_and_refuses_unknown_sets(capsys):
    parser = build_parser()
    assert parser.parse_args(["serve", "--metrics-compat", "tgi,vllm"]).metrics_compat == ("tgi", "vllm")
    assert parser.parse_args(["serve"]).metrics_compat == ("tgi",)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--metrics-compat", "vllm,sglang"])
    assert "unknown metric name set sglang (choose from tgi, vllm)" in capsys.readouterr().err


def test_idle_exposition_has_vllm_names_labels_and_buckets(server):
    got = scrape(server)
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                  "vllm:gpu_cache_usage_perc"):
        assert got[vllm(server, gauge)] == 0, gauge
    for counter in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        assert vllm(server, counter) in got, counter
    for reason in ("stop", "length", "abort", "error"):
        assert vllm(server, "vllm:request_success_total", finished_reason=reason) in got
    ttft_les = {k for k in got if k.startswith("vllm:time_to_first_token_seconds_bucket")}
    assert len(ttft_les) == len(TTFT_BUCKETS) + 1
    assert vllm(server, "vllm:inter_token_latency_seconds_bucket", le=str(ITL_BUCKETS[0])) in got
    assert vllm(server, "vllm:request_prompt_tokens_bucket", le=str(token_buckets(512)[-1])) in got
    for histogram in ("e2e_request_latency_seconds", "time_per_output_token_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds", "request_generation_tokens"):
        assert vllm(server, f"vllm:{histogram}_count") in got, histogram


def test_gauges_follow_running_streams_and_aborts_are_counted(server):
    abort = vllm(server, "vllm:request_success_total", finished_reason="abort")
    aborted_before = scrape(server)[abort]
    streams = HeldStreams(server.base_url, 3)
    try:
        # a batch of one: one running, two waiting; the vLLM gauges equal TGI's in the same scrape
        def loaded():
            got = scrape(server)
            ok = got[vllm(server, "vllm:num_requests_running")] == 1 and got[vllm(server, "vllm:num_requests_waiting")] == 2
            return got if ok and got[vllm(server, "vllm:kv_cache_usage_perc")] > 0 else None
        got = wait_for(loaded, "1 running and 2 waiting")
        assert got["tgi_batch_current_size"] == 1 and got["tgi_queue_size"] == 2
        assert got[vllm(server, "vllm:kv_cache_usage_perc")] == got["genserve_kv_cache_usage_ratio"]
        assert got[vllm(server, "vllm:gpu_cache_usage_perc")] == got["genserve_kv_cache_usage_ratio"]
        first = got[vllm(server, "vllm:generation_tokens_total")]
        wait_for(lambda: scrape(server)[vllm(server, "vllm:generation_tokens_total")] > first, "tokens counted as they run")
        assert scrape(server)[vllm(server, "vllm:time_to_first_token_seconds_count")] >= 1  # before any request ended
    finally:
        streams.close()
    idle = wait_for(lambda: (g := scrape(server))[vllm(server, "vllm:num_requests_running")] == 0
                    and g[vllm(server, "vllm:num_requests_waiting")] == 0 and g, "the aborted streams gone")
    assert idle[abort] == aborted_before + 3
    assert idle[vllm(server, "vllm:kv_cache_usage_perc")] == 0


def test_finished_requests_move_counters_and_histograms(server):
    before = scrape(server)
    body = {"model": "m", "prompt": "The lighthouse keeper", "max_tokens": 6, "ignore_eos": True,
            "temperature": 0}
    first = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120).json()
    assert first["choices"][0]["finish_reason"] == "length"
    text = first["choices"][0]["text"]
    # the same greedy run stopped by its whole output as a stop string: finished_reason "stop", same tokens
    second = httpx.post(server.base_url + "/v1/completions", json={**body, "stop": [text]}, timeout=120).json()
    assert second["choices"][0]["finish_reason"] == "stop"
    after = scrape(server)

    def delta(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert delta(vllm(server, "vllm:request_success_total", finished_reason="length")) == 1
    assert delta(vllm(server, "vllm:request_success_total", finished_reason="stop")) == 1
    usage = [r["usage"] for r in (first, second)]
    assert delta(vllm(server, "vllm:prompt_tokens_total")) == sum(u["prompt_tokens"] for u in usage) \
        == delta("genserve_prompt_tokens_total")
    assert delta(vllm(server, "vllm:generation_tokens_total")) == sum(u["completion_tokens"] for u in usage) \
        == delta("genserve_generation_tokens_total")
    assert delta(vllm(server, "vllm:request_generation_tokens_sum")) == sum(u["completion_tokens"] for u in usage)
    assert delta(vllm(server, "vllm:request_prompt_tokens_sum")) == sum(u["prompt_tokens"] for u in usage)
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_time_per_output_token_seconds"):
        assert delta(vllm(server, f"vllm:{name}_count")) == 2, name
    # the same observations as genserve's own histograms
    assert delta(vllm(server, "vllm:time_to_first_token_seconds_sum")) == pytest.approx(
        delta("genserve_time_to_first_token_seconds_sum"))
    itl = delta(vllm(server, "vllm:inter_token_latency_seconds_count"))
    assert itl == delta("genserve_inter_token_latency_seconds_count") == \
        delta(vllm(server, "vllm:time_per_output_token_seconds_count"))
    assert itl == sum(u["completion_tokens"] - 1 for u in usage)
    assert delta(vllm(server, "vllm:e2e_request_latency_seconds_sum")) > 0
