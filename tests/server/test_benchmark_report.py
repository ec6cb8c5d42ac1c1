"""Benchmark statistics and outputs from hand-made request results."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from genserve.server.benchmark.client import RequestResult
from genserve.server.benchmark.config import BenchmarkConfig, BenchmarkError
from genserve.server.benchmark.report import (
    load_runs,
    markdown,
    percentile,
    plot_png,
    run_to_dict,
    summarize,
    write_outputs,
)
from genserve.server.benchmark.runner import BenchmarkRun, LevelRun


def ok(ttft: float, itl: float | None, tokens: int = 10, e2e: float = 1.0) -> RequestResult:
    return RequestResult(ok=True, sent_at=0.0, ttft=ttft, itl=itl, e2e=e2e, output_tokens=tokens,
                         token_count_source="usage", prompt_tokens=7)


def failed(error: str, message: str = "boom") -> RequestResult:
    return RequestResult(ok=False, sent_at=0.0, error=error, error_message=message)


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def test_summarize_counts_rates_errors_and_goodput():
    results = [ok(0.1, 0.01), ok(0.5, 0.01), ok(0.1, 0.2), ok(0.2, None, tokens=1),
               failed("422", "too long"), failed("422", "again"), failed("connection")]
    level = summarize("concurrency", 4, 2.0, results, slo_ttft=0.3, slo_itl=0.05)
    assert (level["num_requests"], level["num_ok"]) == (7, 4)
    assert level["errors"] == {"422": 2, "connection": 1}
    assert level["error_samples"] == {"422": "too long", "connection": "boom"}
    assert level["output_tokens"] == 31 and level["output_tok_s"] == 15.5 and level["requests_s"] == 2.0
    # TTFT over 0.3 fails the first SLO, ITL over 0.05 the second; a one-token request has no ITL
    assert level["num_good"] == 2 and level["goodput_rps"] == 1.0
    assert level["ttft_s"]["p50"] == pytest.approx(0.15) and level["itl_s"]["mean"] == pytest.approx(0.22 / 3)
    assert level["mean_prompt_tokens"] == 7 and level["token_count_source"] == {"usage": 4}
    no_slo = summarize("rate", 2.0, 2.0, results)
    assert no_slo["num_good"] is None and no_slo["goodput_rps"] is None


def _run(label: str) -> dict:
    config = BenchmarkConfig(url="http://h:1/", label=label, slo_ttft=1.0)
    run = BenchmarkRun(config, "m", 0.0, [LevelRun("concurrency", 1, 1.0, [ok(0.1, 0.01)]),
                                          LevelRun("concurrency", 8, 1.0, [ok(0.4, 0.02), failed("503")]),
                                          LevelRun("rate", 2.5, 2.0, [ok(0.2, 0.01)])])
    return run_to_dict(run, save_requests=True)


def test_json_markdown_png(tmp_path):
    doc = _run("sys-a")
    assert doc["url"] == "http://h:1" and doc["slo"] == {"ttft_s": 1.0, "itl_s": None}
    assert doc["levels"][1]["requests"][1]["error"] == "503"
    paths = {ext: tmp_path / f"r.{ext}" for ext in ("json", "md", "png")}
    write_outputs([doc, _run("sys-b")], str(paths["json"]), str(paths["md"]), str(paths["png"]))
    assert [r["label"] for r in load_runs([paths["json"]])] == ["sys-a", "sys-b"]
    table = paths["md"].read_text()
    assert "| sys-a | c=8 | 1 / 2 | 503: 1 | 10.0 | 1.00 | 1.00 |" in table
    assert "| sys-b | 2.5 req/s | 1 / 1 |" in table
    assert "TTFT <= 1.0 s" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown([doc]).count("| sys-a |") == 3


def test_load_runs_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(BenchmarkError, match="holds no `genserve benchmark` results"):
        load_runs([path])
    with pytest.raises(BenchmarkError, match="cannot read"):
        load_runs([tmp_path / "missing.json"])


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BenchmarkError, match=r"pip install 'genserve\[bench\]'"):
        plot_png([_run("a")], tmp_path / "x.png")
