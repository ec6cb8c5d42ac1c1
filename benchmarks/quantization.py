"""Decode speed and weight memory of `--quantize` none / eetq / fp8 on SmolLM2 (run by hand; not a test).

For each dtype and method: Linear weight bytes, whole-model parameter bytes, and decode tokens/s at
batch 1 and batch 8 (--max-new tokens each, ignore_eos; prefill steps excluded), plus how many of
the unquantized greedy tokens each method reproduces. All configurations run in one process and are
interleaved over rounds, so the ratios hold even on a noisy shared machine.

    .venv/bin/python benchmarks/quantization.py --dtypes float32 bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch  # noqa: E402

from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.layers.linear import LinearBase
from genserve.server.model_files import prepare_default_model
from genserve.server.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results"
METHODS = (None, "eetq", "fp8")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "Write a haiku about autumn leaves.", "The best way to learn a language is", "Q: What is 2+2?\nA:",
           "In 1969, astronauts"]


def param_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters(recurse=False))


def make_engine(model_dir, dtype: str, method: str | None) -> LLMEngine:
    return LLMEngine(EngineConfig(model_id=str(model_dir), dtype=dtype, quantize=method,
                                  max_batch_total_tokens=4096, max_total_tokens=512))


def decode_tokens_per_s(engine: LLMEngine, prompts, max_new: int) -> float:
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    for ids in prompts:
        engine.add_request(ids, params)
    tokens, seconds = 0, 0.0
    while engine.has_unfinished:
        outputs, stats = engine.step()
        if stats and stats.method == "decode":
            seconds += stats.duration_s
            tokens += sum(len(o.new_tokens) for o in outputs)
    return tokens / seconds


def agreement(reference: list[int], other: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b), len(reference))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = prepare_default_model()
    rows = []
    for dtype in args.dtypes:
        engines = {m: make_engine(model_dir, dtype, m) for m in METHODS}
        prompts = [engines[None].tokenizer.encode(p) for p in PROMPTS]
        greedy = {m: e.generate(prompts, SamplingParams(max_new_tokens=32)) for m, e in engines.items()}
        speeds = {(m, b): [] for m in METHODS for b in (1, 8)}
        for _ in range(args.rounds):
            for m, engine in engines.items():
                for batch in (1, 8):
                    speeds[m, batch].append(decode_tokens_per_s(engine, prompts[:batch], args.max_new))
        for m, engine in engines.items():
            model = engine.runner.model
            linears = [x for x in model.modules() if isinstance(x, LinearBase)]
            reference = greedy[None]
            matched = [agreement(r, g) for r, g in zip(reference, greedy[m], strict=True)]
            rows.append({
                "dtype": dtype, "method": m or "none",
                "linear_mib": param_bytes(linears) / 2**20,
                "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                "decode_b1_tok_s": statistics.median(speeds[m, 1]),
                "decode_b8_tok_s": statistics.median(speeds[m, 8]),
                "greedy_prefix_match": sum(matched) / sum(len(r) for r in reference),
            })
            print(rows[-1], flush=True)
        del engines
    write_results(rows, args)


def write_results(rows: list[dict], args) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantization.json").write_text(json.dumps(rows, indent=2))
    base = {r["dtype"]: r for r in rows if r["method"] == "none"}
    lines = [
        "# `--quantize` on SmolLM2-135M-Instruct (CPU)",
        "",
        f"`benchmarks/quantization.py --dtypes {' '.join(args.dtypes)} --threads {args.threads} "
        f"--max-new {args.max_new} --rounds {args.rounds}`, "
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads on a shared 2-core VM. "
        f"Decode tokens/s: median of {args.rounds} interleaved rounds, {args.max_new} new tokens per request, "
        "prefill excluded. Ratios are against `none` of the same dtype in the same run. "
        "Greedy match: share of the unquantized run's greedy tokens (8 prompts, up to 32 tokens or EOS) "
        "that the quantized run reproduces before its first divergence.",
        "",
        "| dtype | method | Linear weights MiB | ratio | all params MiB | decode b=1 tok/s | ratio "
        "| decode b=8 tok/s | ratio | greedy match |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base[r["dtype"]]
        lines.append(
            f"| {r['dtype']} | {r['method']} | {r['linear_mib']:.1f} | {r['linear_mib'] / b['linear_mib']:.3f} "
            f"| {r['model_mib']:.1f} | {r['decode_b1_tok_s']:.1f} | {r['decode_b1_tok_s'] / b['decode_b1_tok_s']:.2f} "
            f"| {r['decode_b8_tok_s']:.1f} | {r['decode_b8_tok_s'] / b['decode_b8_tok_s']:.2f} "
            f"| {r['greedy_prefix_match']:.2f} |")
    (RESULTS / "quantization.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
