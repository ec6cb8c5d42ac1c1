"""Per-level statistics, and the JSON, Markdown and PNG made from them (one run or several merged)."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from genserve.server.benchmark.client import RequestResult
from genserve.server.benchmark.config import BenchmarkConfig, BenchmarkError

SCHEMA = "genserve-benchmark/1"
PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict:
    out = {"mean": sum(values) / len(values) if values else None}
    out.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return out


def meets_slo(r: RequestResult, slo_ttft: float | None, slo_itl: float | None) -> bool:
    if not r.ok:
        return False
    if slo_ttft is not None and r.ttft > slo_ttft:
        return False
    return slo_itl is None or r.itl is None or r.itl <= slo_itl


def summarize(mode: str, value: float, duration: float, results: list[RequestResult],
              slo_ttft: float | None = None, slo_itl: float | None = None) -> dict:
    """One load level: latency percentiles over successful requests, rates over the level's wall time."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.error for r in results if not r.ok)
    samples = {}
    for r in results:
        if not r.ok:
            samples.setdefault(r.error, r.error_message)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    num_good = sum(meets_slo(r, slo_ttft, slo_itl) for r in ok) if slo_ttft is not None or slo_itl is not None else None
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "mode": mode,
        "value": value,
        "num_requests": len(results),
        "num_ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_samples": dict(sorted(samples.items())),
        "duration_s": duration,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / duration if duration > 0 else None,
        "requests_s": len(ok) / duration if duration > 0 else None,
        "num_good": num_good,
        "goodput_rps": num_good / duration if num_good is not None and duration > 0 else None,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        "token_count_source": dict(Counter(r.token_count_source for r in ok)),
        "ttft_s": distribution([r.ttft for r in ok]),
        "itl_s": distribution([r.itl for r in ok if r.itl is not None]),
        "e2e_s": distribution([r.e2e for r in ok]),
    }


def run_to_dict(run, save_requests: bool = False) -> dict:
    """The JSON document of one run (`genserve benchmark --output-json`)."""
    config: BenchmarkConfig = run.config
    levels = []
    for level in run.levels:
        summary = summarize(level.mode, level.value, level.duration, level.results, config.slo_ttft, config.slo_itl)
        if save_requests:
            summary["requests"] = [dataclasses.asdict(r) for r in level.results]
        levels.append(summary)
    return {
        "schema": SCHEMA,
        "label": config.label,
        "url": config.url,
        "api": config.request.api,
        "model": run.model,
        "started_at": datetime.fromtimestamp(run.started_at, timezone.utc).isoformat(timespec="seconds"),
        "slo": {"ttft_s": config.slo_ttft, "itl_s": config.slo_itl},
        "config": dataclasses.asdict(config),
        "client": {"python": platform.python_version(), "genserve": _version()},
        "levels": levels,
    }


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genserve")
    except PackageNotFoundError:
        return None


def load_runs(paths: list[str | Path]) -> list[dict]:
    """Runs from JSON files: each holds one run, or {"runs": [...]} as benchmarks/compare.py writes."""
    runs = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BenchmarkError(f"cannot read {path}: {e}") from None
        found = doc.get("runs", [doc]) if isinstance(doc, dict) else []
        found = [r for r in found if isinstance(r, dict) and r.get("schema") == SCHEMA]
        if not found:
            raise BenchmarkError(f"{path} holds no `genserve benchmark` results")
        runs.extend(found)
    return runs


def level_name(level: dict) -> str:
    return f"c={level['value']:g}" if level["mode"] == "concurrency" else f"{level['value']:g} req/s"


def _num(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _dist(d: dict, scale: float = 1.0, digits: int = 3) -> str:
    return " / ".join(_num(None if d[f"p{q}"] is None else d[f"p{q}"] * scale, digits) for q in PERCENTILES)


def markdown(runs: list[dict]) -> str:
    """One row per system and level; latencies as p50 / p90 / p99."""
    lines = [
        "| system | level | ok / sent | errors | output tok/s | req/s | goodput req/s | TTFT s p50/p90/p99 "
        "| ITL ms p50/p90/p99 | E2E s p50/p90/p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for lv in run["levels"]:
            errors = ", ".join(f"{k}: {v}" for k, v in lv["errors"].items()) or "-"
            lines.append(
                f"| {run['label']} | {level_name(lv)} | {lv['num_ok']} / {lv['num_requests']} | {errors} "
                f"| {_num(lv['output_tok_s'])} | {_num(lv['requests_s'], 2)} | {_num(lv['goodput_rps'], 2)} "
                f"| {_dist(lv['ttft_s'])} | {_dist(lv['itl_s'], 1000, 1)} | {_dist(lv['e2e_s'], 1, 2)} |")
    slos = {(r["slo"]["ttft_s"], r["slo"]["itl_s"]) for r in runs}
    notes = [f"SLO for goodput: TTFT <= {t} s, ITL <= {i} s" for t, i in sorted(slos, key=str) if t is not None or i is not None]
    sources = sorted({s for r in runs for lv in r["levels"] for s in lv["token_count_source"]})
    notes.append("output tokens counted from: " + (", ".join(sources) or "-"))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def plot_png(runs: list[dict], path: str | Path, title: str = "Output throughput against TTFT p90") -> None:
    """Output tok/s (y) against TTFT p90 (x): one line per system and load mode, points named by level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchmarkError("--output-png needs matplotlib: pip install 'genserve[bench]'") from None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    xs_all = []
    for run in runs:
        modes = sorted({lv["mode"] for lv in run["levels"]})
        for mode in modes:
            pts = [(lv["ttft_s"]["p90"], lv["output_tok_s"], level_name(lv)) for lv in run["levels"]
                   if lv["mode"] == mode and lv["ttft_s"]["p90"] is not None and lv["output_tok_s"]]
            if not pts:
                continue
            name = run["label"] + ("" if len(modes) == 1 else f" ({'closed' if mode == 'concurrency' else 'open'} loop)")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            for x, y, text in pts:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            xs_all += [p[0] for p in pts]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("TTFT p90 (s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if xs_all:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_outputs(runs: list[dict], output_json: str | None, output_md: str | None, output_png: str | None) -> None:
    if output_json:
        doc = runs[0] if len(runs) == 1 else {"runs": runs}
        Path(output_json).write_text(json.dumps(doc, indent=2) + "\n")
    if output_md:
        Path(output_md).write_text(markdown(runs))
    if output_png:
        plot_png(runs, output_png)
