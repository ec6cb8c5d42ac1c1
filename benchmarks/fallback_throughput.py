"""Transformers-fallback throughput: batched forwards vs one request per forward (run by hand; not a test).

Random-weight models, SmolLM2's tokenizer, float32: GPT-J (no native model here) and Mixtral (native,
so its paged path is measured beside the fallback). The engine keeps `--streams` requests in flight
(closed loop) and runs each mode in the same process and run, so the ratios hold on a noisy machine:
native, the fallback batched (the default) and one request per forward (GENSERVE_FALLBACK_BATCHING=0,
the fallback before batching).

    .venv/bin/python benchmarks/fallback_throughput.py --streams 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from genserve.server.cpu_env import configure_openmp_wait

configure_openmp_wait()  # the server's setting, before torch loads OpenMP

import torch  # noqa: E402
import transformers  # noqa: E402

from genserve.server.config import EngineConfig  # noqa: E402
from genserve.server.engine import LLMEngine  # noqa: E402
from genserve.server.fallback_runner import BATCHING_ENV  # noqa: E402
from genserve.server.model_files import prepare_default_model  # noqa: E402
from genserve.server.models import get_model_class  # noqa: E402
from genserve.server.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


def cpu_info() -> dict:
    info = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = info.get("Flags", "").split()
    return {"cpu": info.get("Model name"), "cpus": info.get("CPU(s)"),
            "flags_of_interest": [f for f in FLAGS_OF_INTEREST if f in flags], "flags": " ".join(flags)}


def model_config(name: str, args):
    common = dict(vocab_size=49152, eos_token_id=2, bos_token_id=1)
    if name == "gptj":
        return transformers.GPTJConfig(n_positions=2048, n_embd=args.hidden, n_layer=args.layers,
                                       n_head=args.hidden // 64, rotary_dim=32, **common)
    if name == "mixtral":  # 8 experts, top-2, each expert as wide as the hidden size
        return transformers.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.hidden,
                                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                          num_key_value_heads=args.hidden // 128, num_local_experts=8,
                                          num_experts_per_tok=2, max_position_embeddings=2048,
                                          tie_word_embeddings=False, **common)
    raise SystemExit(f"unknown --models entry {name!r} (gptj, mixtral)")


def save_model(folder: Path, name: str, args) -> dict:
    config = model_config(name, args)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(prepare_default_model()).save_pretrained(folder)
    return {"name": name, "architecture": type(model).__name__, "hidden": args.hidden, "layers": args.layers,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def run_mode(folder: Path, mode: str, args) -> dict:
    """mode: native, batched (the fallback) or one (the fallback, one request per forward)."""
    os.environ[BATCHING_ENV] = "0" if mode == "one" else "1"
    engine = LLMEngine(EngineConfig(model_id=str(folder), dtype="float32", device="cpu", num_threads=args.threads,
                                    max_total_tokens=args.prompt + args.max_new + 8, max_batch_size=args.streams,
                                    max_batch_prefill_tokens=args.prompt * args.streams,
                                    max_batch_total_tokens=args.streams * (args.prompt + args.max_new + 16),
                                    use_transformers_fallback=mode != "native"))
    assert engine.model_path_kind == ("native" if mode == "native" else "transformers")
    assert mode == "native" or engine.runner.is_batching == (mode == "batched")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]
    params = SamplingParams(max_new_tokens=args.max_new, ignore_eos=True)
    engine.generate([prompts[0][:8]], SamplingParams(max_new_tokens=2))  # warm-up
    pending, finished, generated, steps = list(prompts), 0, 0, 0
    started = time.perf_counter()
    while finished < args.requests:
        while pending and len(engine.scheduler.running) + len(engine.scheduler.waiting) < args.streams:
            engine.add_request(pending.pop(), params)
        outputs, _ = engine.step()
        steps += 1
        generated += sum(len(o.new_tokens) for o in outputs)
        finished += sum(o.finished for o in outputs)
    elapsed = time.perf_counter() - started
    engine.shutdown()
    return {"mode": MODE_NAMES[mode], "requests": args.requests, "generated_tokens": generated,
            "seconds": round(elapsed, 2), "tok_per_s": round(generated / elapsed, 1), "engine_steps": steps}


MODE_NAMES = {"native": "native (paged)", "batched": "transformers, batched",
              "one": "transformers, one request per forward"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="gptj,mixtral",
                        help="gptj (no native model: the fallback only), mixtral (native too, for comparison)")
    parser.add_argument("--note", default="shared 2-core machine: other sessions were running tests at the same time")
    args = parser.parse_args()
    models = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model = save_model(Path(tmp), name, args)
            modes = (["native"] if get_model_class([model["architecture"]]) else []) + ["batched", "one"]
            model["runs"] = [run_mode(Path(tmp), mode, args) for mode in modes]
        by_mode = {r["mode"]: r["tok_per_s"] for r in model["runs"]}
        model["batched_over_one"] = round(by_mode[MODE_NAMES["batched"]] / by_mode[MODE_NAMES["one"]], 2)
        models.append(model)
    result = {"streams": args.streams, "requests": args.requests, "prompt_tokens": args.prompt,
              "max_new_tokens": args.max_new, "threads": args.threads, "dtype": "float32", "models": models,
              "torch": torch.__version__, "transformers": transformers.__version__, "machine": cpu_info(),
              "note": args.note}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fallback_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    machine = result["machine"]
    lines = [f"# Transformers fallback: {args.streams} streams, batched vs one request per forward", "",
             f"Random weights, float32, {args.threads} threads; {args.requests} requests of {args.prompt} prompt + "
             f"{args.max_new} new tokens, {args.streams} in flight (closed loop), every mode in the same run.", "",
             "| model | mode | tok/s | seconds | engine steps |", "|---|---|---:|---:|---:|"]
    for model in models:
        label = f"{model['architecture']} ({model['params_m']} M, hidden {model['hidden']}, {model['layers']} layers)"
        lines += [f"| {label} | {r['mode']} | {r['tok_per_s']} | {r['seconds']} | {r['engine_steps']} |"
                  for r in model["runs"]]
    lines += [""] + [f"{m['architecture']}: fallback batched / one at a time **x{m['batched_over_one']:.2f}**."
                     for m in models]
    lines += ["", f"CPU: {machine['cpu']} ({machine['cpus']} CPUs; {', '.join(machine['flags_of_interest'])}). "
              f"torch {torch.__version__}, transformers {transformers.__version__}.", "", f"Note: {args.note}.", ""]
    (RESULTS / "fallback_throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
