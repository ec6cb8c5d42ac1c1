"""Where a decode step's time goes: the whole step vs its linears, attention and LM head timed alone.

Fills the engine with B requests (~100-token prompts), lets them reach decode, then times decode
steps through `LLMEngine.step()` and, with the same shapes and weights, each part alone. The ratio
step / (linears + attention + LM head) is the overhead the step adds to the work it must do.

    .venv/bin/python benchmarks/decode_step.py --dtype float32 --batch 1 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from genserve.server.cpu_env import configure_openmp_wait

configure_openmp_wait()

import torch  # noqa: E402

from genserve.server.config import EngineConfig  # noqa: E402
from genserve.server.engine import LLMEngine  # noqa: E402
from genserve.server.layers.attention import Attention, forward_context  # noqa: E402
from genserve.server.layers.linear import LinearBase  # noqa: E402
from genserve.server.model_files import prepare_default_model  # noqa: E402
from genserve.server.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def cpu_description() -> dict:
    info = {"machine": platform.machine()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "Flags", "L3 cache"):
            info[key.strip()] = value.strip()
    flags = set(info.get("Flags", "").split())
    info["simd"] = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    info.pop("Flags", None)
    return info


def best_of(fn, repeats: int = 5, inner: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - started) / inner)
    return best


def parts_alone(engine: LLMEngine, batch: int, inputs) -> dict:
    """Each linear, attention and the LM head run alone on this step's shapes (best of several)."""
    model = engine.runner.model
    dtype = engine.torch_dtype
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    lm_head = model.lm_head
    hidden = model.config.hidden_size

    xs = [torch.randn(batch, m.input_size, dtype=dtype) for m in linears]

    def run_linears_prepared():
        for m, x in zip(linears, xs, strict=True):
            m(x)

    attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    first = attn_layers[0]
    q = torch.randn(batch, first.num_heads * first.head_dim, dtype=dtype)
    k = torch.randn(batch, first.num_kv_heads * first.head_dim, dtype=dtype)

    def run_attention():
        with forward_context(inputs.meta):
            for layer in attn_layers:
                layer(q, k, k)

    h = torch.randn(batch, hidden, dtype=dtype)
    with torch.inference_mode():
        return {
            "linears_ms": best_of(run_linears_prepared) * 1e3,
            "attention_ms": best_of(run_attention) * 1e3,
            "lm_head_ms": best_of(lambda: lm_head(h)) * 1e3,
        }


def measure(model_dir, dtype: str, batch: int, steps: int, prompt_len: int) -> dict:
    engine = LLMEngine(EngineConfig(model_id=str(model_dir), dtype=dtype, max_total_tokens=1024,
                                    max_batch_total_tokens=batch * 512 + 1024, max_batch_prefill_tokens=4096))
    tok = engine.tokenizer
    prompts = [tok.encode(f"Story {i}: " + "the quiet river runs past the old mill " * 20)[:prompt_len]
               for i in range(batch)]
    params = SamplingParams(max_new_tokens=steps + 64, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    durations = []
    captured = {}
    original_prepare = engine.runner.prepare

    def capture(out):
        captured["inputs"] = original_prepare(out)
        return captured["inputs"]

    engine.runner.prepare = capture
    for _ in range(steps):
        started = time.perf_counter()
        _, stats = engine.step()
        durations.append(time.perf_counter() - started)
        assert stats.method == "decode" and stats.batch_size == batch
    engine.runner.prepare = original_prepare
    durations.sort()
    step_ms = durations[len(durations) // 2] * 1e3
    parts = parts_alone(engine, batch, captured["inputs"])
    work = parts["linears_ms"] + parts["attention_ms"] + parts["lm_head_ms"]
    return {"dtype": dtype, "batch": batch, "step_ms_median": round(step_ms, 2),
            "step_ms_best": round(durations[0] * 1e3, 2),
            **{k: round(v, 2) for k, v in parts.items()}, "parts_ms": round(work, 2),
            "step_over_parts": round(step_ms / work, 2), "tokens_per_s": round(batch / step_ms * 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=str(RESULTS / "decode_step.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = prepare_default_model()
    rows = []
    for dtype in args.dtype:
        for batch in args.batch:
            row = measure(model_dir, dtype, batch, args.steps, args.prompt_len)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"cpu": cpu_description(), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
