"""Each native family's output tok/s at 16 streams over HTTP, native against the transformers fallback
(run by hand; not a test).

Per family: one random-weight model of the same size for all (SmolLM2's tokenizer and vocabulary, float32),
served twice, by `genserve serve` natively and with `--use-transformers-fallback`; both servers stay up while
rounds alternate between them (only one is sent requests at a time), so the ratio holds when the machine's speed
drifts. A round is `--streams` streamed /v1/completions at once (ignore_eos, `--max-tokens` each): output tokens
over the round's wall time.

    python benchmarks/family_throughput.py                       # every family, full size
    python benchmarks/family_throughput.py --families llama,gpt2 --quick

Writes benchmarks/results/family_throughput.md (and .json), with the CPU (`lscpu` model name) and the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from serve_process import ServeProcess  # benchmarks/, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 32  # sliding windows shorter than prompt + output, so the windowed paths run
PROMPT = ("Once upon a time, in a small village between the mountains and the sea, there lived an old clockmaker "
          "who repaired every clock in the valley. One winter morning a stranger knocked at his door with a watch")


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    max_tokens: int
    rounds: int


FULL, QUICK = Size(hidden=512, layers=4, max_tokens=32, rounds=2), Size(hidden=256, layers=2, max_tokens=16, rounds=1)


def family_configs(size: Size) -> dict[str, tuple[str, dict]]:
    """family -> (transformers config class, fields): the same width and depth for all; heads of 64."""
    h, n, heads = size.hidden, size.layers, size.hidden // 64
    common = dict(vocab_size=49152, eos_token_id=2, bos_token_id=1, pad_token_id=0, initializer_range=0.2)
    decoder = dict(common, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=heads,
                   num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024)
    moe = dict(num_experts_per_tok=2, tie_word_embeddings=False)
    gemma = dict(decoder, head_dim=64, query_pre_attn_scalar=64, sliding_window=WINDOW,
                 hidden_activation="gelu_pytorch_tanh")
    return {
        "llama": ("LlamaConfig", dict(decoder, tie_word_embeddings=False)),
        "mistral-sliding": ("MistralConfig", dict(decoder, sliding_window=WINDOW)),
        "qwen3": ("Qwen3Config", dict(decoder, head_dim=64)),
        "qwen3-moe": ("Qwen3MoeConfig", dict(decoder, head_dim=64, num_experts=8, moe_intermediate_size=h, **moe)),
        "mixtral": ("MixtralConfig", dict(decoder, intermediate_size=h, num_local_experts=8, **moe)),
        "gemma2": ("Gemma2Config", dict(gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
        "gemma3": ("Gemma3TextConfig", dict(gemma, layer_types=["sliding_attention", "full_attention"] * (n // 2)
                                            + ["sliding_attention"] * (n % 2))),
        "phi3": ("Phi3Config", dict(decoder, tie_word_embeddings=False)),
        "gpt2": ("GPT2Config", dict(common, n_embd=h, n_layer=n, n_head=heads, n_positions=1024)),
        "gpt-neox": ("GPTNeoXConfig", dict(decoder, rotary_pct=0.25, tie_word_embeddings=False)),
        "bloom": ("BloomConfig", dict(common, hidden_size=h, n_layer=n, n_head=heads)),
    }


def save_model(folder: Path, name: str, size: Size) -> dict:
    import torch
    import transformers

    from genserve.server.model_files import prepare_default_model

    config_name, fields = family_configs(size)[name]
    config = getattr(transformers, config_name)(**fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(prepare_default_model()).save_pretrained(folder)
    return {"family": name, "architecture": type(model).__name__,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def run_round(url: str, streams: int, max_tokens: int) -> tuple[float, int]:
    """`streams` streamed completions at once: (seconds, output tokens)."""
    def stream(i: int) -> int:
        body = {"prompt": f"{i}. {PROMPT}", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        tokens = 0
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=1800) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(stream, range(streams)))
    return time.perf_counter() - start, tokens


def serve(folder: Path, path: str, args) -> ServeProcess:
    extra = ["--use-transformers-fallback"] if path == "transformers" else []
    server = ServeProcess(folder, folder.parent / f"serve-{path}.log", "--num-threads", str(args.threads),
                          "--max-total-tokens", "512", "--max-input-tokens", "256",
                          "--max-batch-total-tokens", str(args.streams * 512), *extra)
    kind = httpx.get(server.url + "/info", timeout=60).json().get("model_path_kind")
    if kind != path:
        server.stop()
        raise RuntimeError(f"{folder.name}: /info says {kind!r}, expected {path!r}")
    run_round(server.url, 2, 2)  # warm-up
    return server


def bench_family(name: str, size: Size, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        row = save_model(folder, name, size)
        servers = {}
        try:
            for path in ("native", "transformers"):
                servers[path] = serve(folder, path, args)
            rounds = []
            for index in range(size.rounds):
                for path in ("native", "transformers") if index % 2 == 0 else ("transformers", "native"):
                    seconds, tokens = run_round(servers[path].url, args.streams, size.max_tokens)
                    rounds.append({"round": index, "path": path, "seconds": round(seconds, 2), "tokens": tokens})
                    print(f"{name} round {index} {path}: {tokens} tokens in {seconds:.1f} s", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    for path in ("native", "transformers"):
        done = [r for r in rounds if r["path"] == path]
        row[f"{path}_tok_s"] = round(sum(r["tokens"] for r in done) / sum(r["seconds"] for r in done), 1)
    row["native_over_fallback"] = round(row["native_tok_s"] / row["transformers_tok_s"], 2)
    row["rounds"] = rounds
    return row


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=30).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        return "unknown"


def write_results(result: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "family_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    size = result["size"]
    load_before, load_after = result["load_average_before"], result["load_average_after"]
    lines = [
        f"# Native vs transformers fallback: output tok/s at {result['streams']} streams, per family", "",
        f"`benchmarks/family_throughput.py{' --quick' if result['quick'] else ''}`: random weights, float32, "
        f"hidden {size['hidden']}, {size['layers']} layers, heads of 64, SmolLM2's tokenizer and vocabulary (49,152); "
        f"{result['streams']} streamed /v1/completions at once, {size['max_tokens']} tokens each (ignore_eos), "
        f"{size['rounds']} round(s) per path, alternating between the two servers; `--num-threads "
        f"{result['threads']}`.", "",
        "| family | architecture | params (M) | native tok/s | fallback tok/s | native / fallback |",
        "|---|---|---:|---:|---:|---:|",
        *(f"| {r['family']} | `{r['architecture']}` | {r['params_m']} | {r['native_tok_s']} | "
          f"{r['transformers_tok_s']} | **x{r['native_over_fallback']:.2f}** |" for r in result["families"]), "",
        f"CPU: {result['cpu']} (`lscpu` model name), {result['cpus']} CPUs. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{x:.2f}' for x in load_before)}; after: {', '.join(f'{x:.2f}' for x in load_after)}.",
    ]
    if max(load_before[0], load_after[0]) > 0.5 * result["cpus"]:
        lines += ["", f"**Taken under load** (load average above half the {result['cpus']} CPUs): the absolute "
                  "figures are low and noisy; the ratios, from alternating rounds, are the result."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    (output / "family_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(family_configs(FULL)),
                        help="comma-separated subset of: " + ", ".join(family_configs(FULL)))
    parser.add_argument("--quick", action="store_true",
                        help=f"hidden {QUICK.hidden}, {QUICK.layers} layers, {QUICK.max_tokens} tokens, one round")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = sorted(set(names) - set(family_configs(size)))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(family_configs(size))}")
    load_before = os.getloadavg()
    families = [bench_family(name, size, args) for name in names]
    result = {"streams": args.streams, "threads": args.threads, "quick": args.quick, "size": asdict(size),
              "families": families, "cpu": cpu_model(), "cpus": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "note": args.note}
    write_results(result, args.output)


if __name__ == "__main__":
    main()
