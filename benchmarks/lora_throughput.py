"""Multi-LoRA throughput over HTTP: tok/s of 32 streams spread over 4 adapters against 32 base-model streams,
on one `genserve serve` of SmolLM2 with 4 peft adapters (random weights, ranks 8 and 16, attention and MLP
targets). The two arms alternate round by round on the same server, and the figure is the ratio within the
run, because the machine is shared and its absolute speed drifts.

    python benchmarks/lora_throughput.py [--rounds 3] [--streams 32] [--max-tokens 32]

Writes benchmarks/results/lora_throughput.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serve_process import ServeProcess  # benchmarks/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))  # lora_helpers: peft adapters

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTERS = {
    "a0": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "a1": dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "a2": dict(r=8, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "a3": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"]),
}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Write a haiku about the sea:"]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def make_adapters(model_dir: Path, out: Path) -> dict[str, Path]:
    from lora_helpers import load_base
    from lora_helpers import make_adapters as make

    return make(load_base(model_dir), out, ADAPTERS)


def run_arm(url: str, models: list[str], max_tokens: int) -> tuple[float, int]:
    """All streams at once (OpenAI completions, streamed, ignore_eos): (seconds, tokens generated)."""
    def stream(i: int) -> int:
        body = {"model": models[i], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        tokens = 0
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=1200) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        tokens = sum(pool.map(stream, range(len(models))))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    from genserve.server.model_files import DEFAULT_MODEL_ID, prepare_default_model

    model_dir = prepare_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(model_dir, Path(tmp))
        spec = ",".join(f"{name}={folder}" for name, folder in folders.items())
        server = ServeProcess(model_dir, Path(tmp) / "serve.log", "--lora-adapters", spec, "--max-loras", "4",
                              "--max-total-tokens", "512", "--max-batch-total-tokens", "32768")
        try:
            lora_models = [list(folders)[i % len(folders)] for i in range(args.streams)]
            arms = {"lora": lora_models, "base": [DEFAULT_MODEL_ID] * args.streams}
            run_arm(server.url, arms["base"][:4], 4)  # warm-up
            rows = []
            for round_index in range(args.rounds):
                order = ["lora", "base"] if round_index % 2 == 0 else ["base", "lora"]  # interleaved
                for arm in order:
                    seconds, tokens = run_arm(server.url, arms[arm], args.max_tokens)
                    rows.append({"round": round_index, "arm": arm, "seconds": seconds, "tokens": tokens,
                                 "tok_s": tokens / seconds})
                    print(f"round {round_index} {arm}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s",
                          flush=True)
        finally:
            server.stop()
    totals = {arm: (sum(r["tokens"] for r in rows if r["arm"] == arm), sum(r["seconds"] for r in rows if r["arm"] == arm))
              for arm in ("lora", "base")}
    tok_s = {arm: t / s for arm, (t, s) in totals.items()}
    ratio = tok_s["lora"] / tok_s["base"]
    result = {"cpu": cpu_model(), "streams": args.streams, "max_tokens": args.max_tokens, "rounds": rows,
              "tok_s": tok_s, "ratio": ratio, "adapters": ADAPTERS}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_throughput.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Multi-LoRA throughput (benchmarks/lora_throughput.py)", "",
        f"CPU: {result['cpu']} (`lscpu` model name); SmolLM2-135M-Instruct float32 on CPU; "
        f"{args.streams} concurrent streamed /v1/completions, {args.max_tokens} tokens each (ignore_eos), "
        f"arms interleaved over {args.rounds} rounds on one server. The machine is shared, so the absolute "
        "figures drift; the ratio within the run is the result.", "",
        "| round | arm | tokens | seconds | tok/s |", "|---|---|---|---|---|",
        *(f"| {r['round']} | {r['arm']} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} |" for r in rows), "",
        f"**{args.streams} streams over 4 adapters: {tok_s['lora']:.1f} tok/s; {args.streams} base streams: "
        f"{tok_s['base']:.1f} tok/s; ratio {ratio:.2f}x** (target >= 0.8x).", "",
        "Adapters: " + "; ".join(f"{n}: r={a['r']} on {', '.join(a['target_modules'])}" for n, a in ADAPTERS.items()),
    ]
    (RESULTS / "lora_throughput.md").write_text("\n".join(lines) + "\n")
    print(f"ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
