"""`genserve benchmark` against a real `genserve serve` (SmolLM2, uvicorn): exact counts, 422s, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from http_server import reference_tokenizer, start_server

from genserve.server.benchmark.command import benchmark
from genserve.server.benchmark.config import BenchmarkConfig, LoadConfig, RequestConfig, WorkloadConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("serve"))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_cli_counts_tokens_and_requests_exactly(server, tmp_path):
    out = {ext: tmp_path / f"r.{ext}" for ext in ("json", "md", "png")}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "genserve"), "benchmark", "--url", server.base_url, "--concurrency", "1,3",
         "--num-prompts", "3", "--input-tokens", "16", "--output-tokens", "6", "--warmup", "1",
         "--slo-ttft", "120", "--slo-itl", "120", "--no-progress", "--output-json", str(out["json"]),
         "--output-md", str(out["md"]), "--output-png", str(out["png"])],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out["json"].read_text())
    assert doc["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and doc["api"] == "completions"
    for level in doc["levels"]:
        assert (level["num_requests"], level["num_ok"], level["errors"]) == (3, 3, {})
        assert level["output_tokens"] == 3 * 6 and level["token_count_source"] == {"usage": 3}
        assert level["mean_prompt_tokens"] == 16  # the synthetic prompt's length is the server's count too
        assert level["num_good"] == 3 and level["ttft_s"]["p99"] <= level["e2e_s"]["p99"]
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| genserve | c=3 | 3 / 3 | - |" in out["md"].read_text()


def _config(server, api: str, num: int = 4, dataset: str | None = None) -> BenchmarkConfig:
    return BenchmarkConfig(url=server.base_url, workload=WorkloadConfig(input_tokens=12, output_tokens=5,
                                                                        dataset=dataset),
                           request=RequestConfig(api=api), load=LoadConfig(concurrency=[2], num_prompts=num,
                                                                           warmup=0, progress=False))


def test_chat_reaches_max_tokens_with_ignore_eos(server):
    (level,) = benchmark(_config(server, "chat"), tokenizer=reference_tokenizer())["levels"]
    assert (level["num_ok"], level["output_tokens"], level["token_count_source"]) == (4, 20, {"usage": 4})


def test_tgi_counts_from_details(server):
    doc = benchmark(_config(server, "tgi"), tokenizer=reference_tokenizer(), save_requests=True)
    (level,) = doc["levels"]
    assert level["num_ok"] == 4 and level["token_count_source"] == {"details": 4}
    # no ignore_eos on TGI's API: an output may end early, and then its details say so
    for r in level["requests"]:
        assert 1 <= r["output_tokens"] <= 5 and r["output_tokens"] == r["num_events"]
        assert r["finish_reason"] == ("length" if r["output_tokens"] == 5 else "eos_token")
    assert level["output_tokens"] == sum(r["output_tokens"] for r in level["requests"])


def test_too_long_prompts_counted_under_422(server, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "The sky is"}, {"prompt": "hello " * 1500}]  # the server's limit is 1023 input tokens
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (level,) = benchmark(_config(server, "completions", num=4, dataset=str(path)))["levels"]
    assert (level["num_requests"], level["num_ok"], level["errors"]) == (4, 2, {"422": 2})
    assert level["output_tokens"] == 10 and "1023" in level["error_samples"]["422"]
