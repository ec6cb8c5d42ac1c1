"""Encoder-decoder throughput: the native paged runner vs the transformers runner (run by hand; not a test).

Random-weight t5-small- and bart-base-shaped models, SmolLM2's tokenizer, float32. Each round runs the
same requests (all sent at once, greedy, ignore_eos) through both engines in the same process,
alternating, so the ratio holds on a noisy machine; the two must produce the same ids.

    .venv/bin/python benchmarks/seq2seq_throughput.py --requests 16 --new 32 --rounds 2 --threads 2
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
from genserve.server.model_files import prepare_default_model  # noqa: E402
from genserve.server.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VOCAB = 49152  # SmolLM2's tokenizer
MODELS = {  # the published shapes of t5-small and bart-base
    "t5-small": lambda: transformers.T5Config(vocab_size=VOCAB, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                              num_heads=8, decoder_start_token_id=0),
    "bart-base": lambda: transformers.BartConfig(vocab_size=VOCAB, d_model=768, encoder_layers=6, decoder_layers=6,
                                                 encoder_attention_heads=12, decoder_attention_heads=12,
                                                 encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                                                 forced_bos_token_id=None, forced_eos_token_id=None),
}


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def run(engine: LLMEngine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    ids = engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    return time.perf_counter() - started, ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    tokenizer_dir = prepare_default_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]
    load = [os.getloadavg()[0]]
    results = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            transformers.AutoModelForSeq2SeqLM.from_config(MODELS[name]()).save_pretrained(tmp)
            transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
            settings = dict(model_id=tmp, dtype="float32", max_total_tokens=512, max_batch_total_tokens=32768,
                            max_batch_prefill_tokens=4096, num_threads=args.threads)
            engines = {"native": LLMEngine(EngineConfig(**settings)),
                       "transformers": LLMEngine(EngineConfig(**settings, use_transformers_fallback=True))}
            seconds = {mode: [] for mode in engines}
            for _ in range(args.rounds):
                outputs = {}
                for mode, engine in engines.items():
                    elapsed, outputs[mode] = run(engine, prompts, args.new)
                    seconds[mode].append(elapsed)
                assert outputs["native"] == outputs["transformers"], f"{name}: the runners disagree"
            tokens = args.requests * args.new
            row = {"model": name, "tokens": tokens,
                   **{f"{mode}_tok_s": round(tokens / min(s), 1) for mode, s in seconds.items()}}
            row["native_over_transformers"] = round(row["native_tok_s"] / row["transformers_tok_s"], 2)
            results.append(row)
            print(row, flush=True)
    load.append(os.getloadavg()[0])
    report = {"cpu": cpu_model(), "threads": args.threads, "requests": args.requests, "prompt_tokens": args.prompt,
              "new_tokens": args.new, "rounds": args.rounds, "load_before_after": load, "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "seq2seq_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Encoder-decoder: native paged runner vs transformers runner ({report['cpu']}, "
             f"{args.threads} threads, load {load[0]:.1f} -> {load[1]:.1f})", "",
             f"{args.requests} requests at once, {args.prompt} prompt tokens, {args.new} new tokens each, float32, "
             f"best of {args.rounds} rounds; both runners produce the same ids.", "",
             "| model | native tok/s | transformers tok/s | native / transformers |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['native_tok_s']} | {r['transformers_tok_s']} | x{r['native_over_transformers']} |"
              for r in results]
    (RESULTS / "seq2seq_throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
