"""`genserve benchmark` against a fake streaming endpoint: exact counts, errors by kind, arrivals, dead ends."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_fake import FakeEndpoint, serve

from genserve.server.benchmark.config import BenchmarkConfig, LoadConfig, RequestConfig, WorkloadConfig
from genserve.server.benchmark.report import run_to_dict
from genserve.server.benchmark.runner import poisson_schedule, run_benchmark

pytestmark = pytest.mark.timeout(120)
GENSERVE = str(Path(sys.executable).parent / "genserve")


def dataset(tmp_path: Path, prompts: list[str], output_tokens: int = 5) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output_tokens": output_tokens}) + "\n" for p in prompts))
    return str(path)


def config(url: str, data: str, concurrency=(), rates=(), num_prompts: int = 0, warmup: int = 0,
           **request) -> BenchmarkConfig:
    return BenchmarkConfig(url=url, label="fake", workload=WorkloadConfig(dataset=data),
                           request=RequestConfig(**request),
                           load=LoadConfig(concurrency=list(concurrency), request_rates=list(rates),
                                           num_prompts=num_prompts, warmup=warmup, progress=False))


@pytest.mark.parametrize("api", ["completions", "chat", "tgi"])
async def test_counts_tokens_and_requests_exactly(tmp_path, api):
    fake = FakeEndpoint()
    async with serve(fake) as url:
        run = await run_benchmark(config(url, dataset(tmp_path, ["a", "b", "c"]), concurrency=[1, 3],
                                         num_prompts=6, warmup=1, api=api))
    doc = run_to_dict(run)
    source = "details" if api == "tgi" else "usage"
    for level in doc["levels"]:
        assert (level["num_requests"], level["num_ok"], level["errors"]) == (6, 6, {})
        assert level["output_tokens"] == 6 * 5
        assert level["token_count_source"] == {source: 6}
        assert level["mean_prompt_tokens"] == 3
        assert level["ttft_s"]["p50"] > 0 and level["itl_s"]["p50"] >= 0
    assert len(fake.bodies) == 1 + 12
    if api == "tgi":
        assert fake.bodies[0]["parameters"] == {"max_new_tokens": 5, "details": True}
    else:
        assert doc["model"] == "fake-model"
        body = fake.bodies[0]
        assert body["model"] == "fake-model" and body["ignore_eos"] is True and body["max_tokens"] == 5
        assert body["stream_options"] == {"include_usage": True}


async def test_counts_stream_events_without_usage(tmp_path):
    fake = FakeEndpoint(usage=False)
    async with serve(fake) as url:
        run = await run_benchmark(config(url, dataset(tmp_path, ["a", "b"], output_tokens=7), concurrency=[2],
                                         num_prompts=4, api="chat", request_usage=False, ignore_eos=False))
    (level,) = run_to_dict(run)["levels"]
    # the chat role chunk (empty content) is not a token
    assert (level["num_ok"], level["output_tokens"], level["token_count_source"]) == (4, 28, {"events": 4})
    assert all("stream_options" not in b and "ignore_eos" not in b for b in fake.bodies)


async def test_errors_by_status_and_connection(tmp_path):
    fake = FakeEndpoint()
    async with serve(fake) as url:
        run = await run_benchmark(config(url, dataset(tmp_path, ["ok", "FAIL", "ok", "DROP", "FAIL"]),
                                         concurrency=[2], num_prompts=5))
    (level,) = run_to_dict(run)["levels"]
    assert level["errors"] == {"503": 2, "connection": 1}
    assert (level["num_requests"], level["num_ok"], level["output_tokens"]) == (5, 2, 10)
    assert level["error_samples"]["503"] == "overloaded"


async def test_request_timeout_is_an_error_not_a_hang(tmp_path):
    fake = FakeEndpoint()
    async with serve(fake) as url:
        run = await run_benchmark(config(url, dataset(tmp_path, ["ok", "STALL"]), concurrency=[2], num_prompts=2,
                                         request_timeout=5))  # generous: the "ok" one must finish on a busy box
    (level,) = run_to_dict(run)["levels"]
    assert (level["num_ok"], level["errors"]) == (1, {"timeout": 1})


def test_poisson_schedule_statistics():
    rate, n = 4.0, 5000
    times = poisson_schedule(rate, n, seed=0)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 0 and all(g >= 0 for g in gaps) and len(times) == n
    mean = sum(gaps) / len(gaps)
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1))
    assert mean == pytest.approx(1 / rate, rel=0.05)
    assert std / mean == pytest.approx(1.0, abs=0.06)  # exponential gaps: coefficient of variation 1
    # Kolmogorov-Smirnov against Exp(rate), 1 % level
    xs = sorted(gaps)
    d = max(max(abs((i + 1) / len(xs) - (1 - math.exp(-rate * x))), abs(i / len(xs) - (1 - math.exp(-rate * x))))
            for i, x in enumerate(xs))
    assert d < 1.63 / math.sqrt(len(xs))
    # arrivals per second: Poisson, so variance ~ mean
    counts = [0] * int(times[-1])
    for t in times:
        if int(t) < len(counts):
            counts[int(t)] += 1
    m = sum(counts) / len(counts)
    var = sum((c - m) ** 2 for c in counts) / (len(counts) - 1)
    assert m == pytest.approx(rate, rel=0.05) and var / m == pytest.approx(1.0, abs=0.2)
    assert poisson_schedule(rate, 50, seed=1) == poisson_schedule(rate, 50, seed=1) != poisson_schedule(rate, 50, 2)


async def test_open_loop_sends_on_schedule(tmp_path):
    fake = FakeEndpoint()
    rate, n = 40.0, 24
    cfg = config(url="http://x", data=dataset(tmp_path, [f"p{i}" for i in range(n)], output_tokens=2),
                 rates=[rate], num_prompts=n)
    async with serve(fake) as url:
        cfg.url = url
        run = await run_benchmark(cfg)
    (level,) = run.levels
    schedule = poisson_schedule(rate, n, seed=cfg.load.seed)
    assert [r.ok for r in level.results] == [True] * n and len(fake.arrivals) == n
    # never early (a busy machine may make a send late, so lateness is not asserted)
    assert all(r.sent_at >= t - 1e-3 for r, t in zip(level.results, schedule, strict=True))
    assert sorted(fake.bodies, key=lambda b: int(b["prompt"][1:])) == fake.bodies  # sent in order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wait", ["0", "1"])
def test_dead_endpoint_exits_nonzero_with_one_line(tmp_path, wait):
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([GENSERVE, "benchmark", "--url", url, "--dataset", dataset(tmp_path, ["a"]),
                           "--wait-ready", wait], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip() == (f"genserve benchmark: error: {url} is not ready after {wait} s: cannot connect "
                                   "(connection refused)" + ("; is the server running? --wait-ready SECONDS waits "
                                                             "for it" if wait == "0" else ""))


async def _genserve(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(GENSERVE, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode, out.decode(), err.decode()


async def test_cli_writes_json_markdown_png_and_merges(tmp_path):
    data = dataset(tmp_path, ["a", "b", "FAIL", "c"], output_tokens=3)
    files = {}
    async with serve(FakeEndpoint()) as url:
        for label in ("one", "two"):
            files[label] = {ext: str(tmp_path / f"{label}.{ext}") for ext in ("json", "md", "png")}
            rc, out, err = await _genserve(
                "benchmark", "--url", url, "--dataset", data, "--concurrency", "1,2", "--request-rate", "50",
                "--num-prompts", "4", "--label", label, "--slo-ttft", "30", "--slo-itl", "30", "--no-progress",
                "--output-json", files[label]["json"], "--output-md", files[label]["md"],
                "--output-png", files[label]["png"])
            assert rc == 0, err
    doc = json.loads(Path(files["one"]["json"]).read_text())
    assert doc["schema"] == "genserve-benchmark/1" and doc["label"] == "one" and doc["api"] == "completions"
    assert doc["slo"] == {"ttft_s": 30.0, "itl_s": 30.0}
    assert [(lv["mode"], lv["value"]) for lv in doc["levels"]] == [("concurrency", 1), ("concurrency", 2), ("rate", 50.0)]
    for lv in doc["levels"]:
        assert (lv["num_requests"], lv["num_ok"], lv["errors"], lv["output_tokens"]) == (4, 3, {"503": 1}, 9)
        assert lv["num_good"] == 3 and lv["goodput_rps"] == pytest.approx(lv["requests_s"])
        assert set(lv["ttft_s"]) == {"mean", "p50", "p90", "p99"}
    assert Path(files["one"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| one | c=2 | 3 / 4 | 503: 1 |" in Path(files["one"]["md"]).read_text()
    assert "| two | c=1 |" in out

    merged = tmp_path / "merged"
    rc, out, err = await _genserve("benchmark", "plot", files["one"]["json"], files["two"]["json"],
                                   "--output-png", f"{merged}.png", "--output-md", f"{merged}.md",
                                   "--output-json", f"{merged}.json")
    assert rc == 0, err
    assert Path(f"{merged}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["label"] for r in json.loads(Path(f"{merged}.json").read_text())["runs"]] == ["one", "two"]
    table = Path(f"{merged}.md").read_text()
    assert "| one | 50 req/s |" in table and "| two | 50 req/s |" in table
