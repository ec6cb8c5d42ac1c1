"""Single-stream decode speed, memory and greedy agreement of quantized SmolLM2 weights, in-process.

Variants: fp32, --quantize int8, int4 (groups of 128), int4-g32, the Q4_1 .gguf served quantized, and
llama.cpp (llama-cpp-python from /work/peers/llamacpp, when present) on the same .gguf in the same run.
Decode tok/s = (72 - 8) new tokens / (time for 72 - time for 8), best of the rounds, so prefill and
start-up cancel out. Agreement: 16 prompts x 32 greedy tokens against fp32, the first divergence each.

    .venv/bin/python benchmarks/quantized_decode.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from genserve.server.cpu_env import configure_openmp_wait

configure_openmp_wait()

import torch  # noqa: E402
from llamacpp_inprocess import LLAMACPP_SCRIPT, LONG, PROMPT, SHORT  # noqa: E402

from genserve.server.config import EngineConfig  # noqa: E402
from genserve.server.engine import LLMEngine  # noqa: E402
from genserve.server.layers.embedding import VocabParallelEmbedding  # noqa: E402
from genserve.server.layers.linear import LinearBase  # noqa: E402
from genserve.server.model_files import default_gguf_file, prepare_default_model  # noqa: E402
from genserve.server.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LLAMACPP_PYTHON = Path("/work/peers/llamacpp/bin/python")
AGREEMENT_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,", "The best way to learn is",
    "Water boils at", "import numpy as np\n", "My favourite colour is", "The meaning of life", "Translate to French: hello",
    "A haiku about autumn:", "SELECT * FROM", "The sun rises in the", "Photosynthesis is", "Dear Sir or Madam,",
    "List three fruits:",
]



def lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def linear_bytes(model) -> tuple[int, int]:
    """(bytes allocated for the linears' weights + scales + mins, bf16 bytes of the same weights)."""
    storages, bf16 = {}, 0
    for m in model.modules():
        if isinstance(m, LinearBase):
            bf16 += m.input_size * m.output_size * 2
            for name, p in m.named_parameters(recurse=False):
                if name != "bias":
                    storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
            if getattr(m, "packed_weight", None) is not None:  # oneDNN's opaque layout: fp32, same size
                storages[id(m.packed_weight)] = m.input_size * m.output_size * 4
    return sum(storages.values()), bf16


def vocabulary_bytes(model) -> int:
    """Bytes of the embedding and LM head (once when tied): float, or grouped integers with scales and mins."""
    storages = {}
    for m in model.modules():
        if isinstance(m, VocabParallelEmbedding):
            for p in m.parameters(recurse=False):
                storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
            if getattr(m, "packed_weight", None) is not None:
                storages[id(m.packed_weight)] = m.num_embeddings_per_rank * m.embedding_dim * 4  # oneDNN's copy, fp32
    return sum(storages.values())


def decode_rate(engine: LLMEngine, prompt: list[int], rounds: int) -> float:
    def run(n: int) -> float:
        start = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))
        return time.perf_counter() - start

    run(SHORT)
    return (LONG - SHORT) / min(run(LONG) - run(SHORT) for _ in range(rounds))


def first_divergence(reference: list[int], other: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b), len(reference))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-name", default="quantized_decode", help="results/<name>.json and .md")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset (fp32, int8, int4 (g128), int4-g32, GGUF Q4_1); llama.cpp always runs")
    args = parser.parse_args()
    model_dir = prepare_default_model()
    gguf = str(default_gguf_file())
    variants = {"fp32": (str(model_dir), None), "int8": (str(model_dir), "int8"),
                "int4 (g128)": (str(model_dir), "int4"), "int4-g32": (str(model_dir), "int4-g32")}
    variants["GGUF Q4_1"] = (gguf, None)
    if args.variants:
        wanted = {v.strip() for v in args.variants.split(",")}
        variants = {name: v for name, v in variants.items() if name in wanted}
    rows, reference = [], None
    for name, (model_id, quantize) in variants.items():
        engine = LLMEngine(EngineConfig(model_id=model_id, quantize=quantize, dtype="float32",
                                        num_threads=args.threads, max_batch_total_tokens=8192, max_total_tokens=512))
        prompt = engine.tokenizer.encode(PROMPT)
        rate = decode_rate(engine, prompt, args.rounds)
        stored, bf16 = linear_bytes(engine.runner.model)
        outputs = engine.generate([engine.tokenizer.encode(p) for p in AGREEMENT_PROMPTS],
                                  SamplingParams(max_new_tokens=32, ignore_eos=True))
        reference = reference or outputs
        divergence = [first_divergence(r, o) for r, o in zip(reference, outputs, strict=True)]
        rows.append({"variant": name, "decode_tok_s": round(rate, 1), "linear_MiB": round(stored / 2**20, 1),
                     "linear_vs_bf16": round(stored / bf16, 3),
                     "vocabulary_MiB": round(vocabulary_bytes(engine.runner.model) / 2**20, 1), "weights_MiB": round(engine.runner.weight_bytes / 2**20, 1),
                     "first_divergence_vs_fp32": divergence,
                     "tokens_before_divergence": round(sum(divergence) / (32 * len(divergence)), 3)})
        print(rows[-1], flush=True)
        del engine
    if LLAMACPP_PYTHON.is_file():
        out = subprocess.run([str(LLAMACPP_PYTHON), "-c", LLAMACPP_SCRIPT, gguf, PROMPT, str(args.threads),
                              str(SHORT), str(LONG), str(args.rounds)], capture_output=True, text=True)
        if out.returncode == 0:
            rows.append({"variant": "llama.cpp Q4_1 (llama-cpp-python)", **json.loads(out.stdout.strip().splitlines()[-1])})
        else:
            rows.append({"variant": "llama.cpp Q4_1", "error": out.stderr.strip()[-300:]})
        print(rows[-1], flush=True)
    report = {"threads": args.threads, "torch": torch.__version__, "python": sys.version.split()[0],
              "lscpu": lscpu(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output_name}.json").write_text(json.dumps(report, indent=2))
    lines = ["# Quantized decode, SmolLM2-135M-Instruct, one stream, in-process",
             "", f"{args.threads} threads, torch {torch.__version__}; `benchmarks/quantized_decode.py`.", "",
             "| variant | decode tok/s | linears MiB | linears / bf16 bytes | embedding + LM head MiB "
             "| tokens before divergence vs fp32 |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row.get('decode_tok_s', row.get('error', ''))} | "
                     f"{row.get('linear_MiB', '')} | {row.get('linear_vs_bf16', '')} | {row.get('vocabulary_MiB', '')} | "
                     f"{row.get('tokens_before_divergence', '')} |")
    lines += ["", "```", report["lscpu"].strip(), "```"]
    (RESULTS / f"{args.output_name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
