"""Quantized serving over HTTP (run by hand; not a test): genserve on SmolLM2's Q4_1 GGUF against llama.cpp's
server on the same file, at 1 and 32 streams, and genserve's 4-bit against its float model at 32 streams.

All servers start once and stay up; each round runs every (arm, level) once, arms interleaved, so a busy
machine slows them alike and the ratios within a round hold. The report gives each round and the median
over rounds. Arms:

    genserve-q4_1   genserve serve --model-id <the .gguf> (linears Q4_1, LM head / embedding Q8_0, kept quantized)
    genserve-q4_1-int8act  the same with --activation-quantization int8 (llama.cpp's integer arithmetic)
    llamacpp-q4_1   python -m llama_cpp.server --model <the .gguf> (one request at a time: 32 streams queue)
    genserve-q4_1-steps8, genserve-q4_1-int8act-steps8  the two above with --num-scheduler-steps 8 (8 greedy
                    decode steps per native call; tokens stream in bursts of 8), at 1 stream
    genserve-q4_1-bf16  the Q4_1 file at --dtype bfloat16 (activations bf16; on AMX the tiles' kernel), 32 streams
    genserve-q4_1-bf16-int8act  the same with --activation-quantization int8 (VNNI panels where the CPU has them)
    genserve-float  genserve serve on the safetensors folder at --dtype (auto: what genserve picks on this CPU)

"ITL" is each request's mean time per token after the first ((last - first token time) / (tokens - 1)), so bursts
of 8 count as 8 tokens over the time they took.

    .venv/bin/python benchmarks/quant_http.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import ROOT, free_port, gguf_path, machine, start, stop, versions, wait_ready  # noqa: E402
from llamacpp_inprocess import LLAMACPP_SCRIPT, LONG, PROMPT, SHORT  # noqa: E402

from genserve.server.benchmark.command import benchmark  # noqa: E402
from genserve.server.benchmark.config import BenchmarkConfig, LoadConfig, RequestConfig, WorkloadConfig  # noqa: E402
from genserve.server.benchmark.workload import load_tokenizer  # noqa: E402
from genserve.server.model_files import default_model_dir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class Arm:
    def __init__(self, name: str, command: list[str], env: dict, python: str, packages: list[str],
                 levels: tuple[int, ...], request: dict) -> None:
        self.name, self.command, self.env, self.python, self.packages = name, command, env, python, packages
        self.levels, self.request = levels, request
        self.port = free_port()
        self.command += ["--port", str(self.port)]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None


def arms(args) -> list[Arm]:
    gguf, venv, llama = str(gguf_path(args.gguf)), Path(args.genserve_venv), Path(args.llamacpp_venv)
    threads = {"OMP_NUM_THREADS": str(args.threads)}
    serve = [str(venv / "bin/genserve"), "serve", "--num-threads", str(args.threads), "--hostname", "127.0.0.1"]
    genserve_request = {"ignore_eos": True}
    # llama.cpp has no ignore_eos: min_tokens holds its outputs at the length
    llama_request = {"ignore_eos": False, "extra_body": {"min_tokens": args.output_tokens}}
    out = [Arm("genserve-q4_1", [*serve, "--model-id", gguf, "--dtype", "float32"], threads,
               str(venv / "bin/python"), ["genserve", "torch"], (1, 32), genserve_request),
           Arm("genserve-q4_1-int8act", [*serve, "--model-id", gguf, "--dtype", "float32",
                                         "--activation-quantization", "int8"], threads,
               str(venv / "bin/python"), ["genserve", "torch"], (1, 32), genserve_request),
           Arm("genserve-q4_1-steps8", [*serve, "--model-id", gguf, "--dtype", "float32", "--num-scheduler-steps",
                                        "8"], threads, str(venv / "bin/python"), ["genserve", "torch"], (1,),
               genserve_request),
           Arm("genserve-q4_1-int8act-steps8", [*serve, "--model-id", gguf, "--dtype", "float32",
                                                "--activation-quantization", "int8", "--num-scheduler-steps", "8"],
               threads, str(venv / "bin/python"), ["genserve", "torch"], (1,), genserve_request),
           Arm("llamacpp-q4_1", [str(llama / "bin/python"), "-m", "llama_cpp.server", "--model", gguf, "--n_threads",
                                 str(args.threads), "--n_ctx", "2048", "--interrupt_requests", "False",
                                 "--host", "127.0.0.1"], threads, str(llama / "bin/python"), ["llama_cpp_python"],
               (1, 32), llama_request),
           Arm("genserve-q4_1-bf16", [*serve, "--model-id", gguf, "--dtype", "bfloat16"], threads,
               str(venv / "bin/python"), ["genserve", "torch"], (32,), genserve_request),
           Arm("genserve-q4_1-bf16-int8act", [*serve, "--model-id", gguf, "--dtype", "bfloat16",
                                              "--activation-quantization", "int8"], threads,
               str(venv / "bin/python"), ["genserve", "torch"], (32,), genserve_request),
           Arm(f"genserve-{args.dtype}", [*serve, "--model-id", str(args.model_dir), "--dtype", args.dtype], threads,
               str(venv / "bin/python"), ["genserve", "torch"], (32,), genserve_request)]
    return out


def run_level(arm: Arm, concurrency: int, args, tokenizer) -> dict:
    prompts = args.prompts_1 if concurrency == 1 else args.prompts_32
    config = BenchmarkConfig(
        url=arm.url, label=arm.name, wait_ready=60,
        workload=WorkloadConfig(input_tokens=args.input_tokens, output_tokens=args.output_tokens, seed=args.seed),
        request=RequestConfig(api="completions", request_timeout=1800, **arm.request),
        load=LoadConfig(concurrency=[concurrency], num_prompts=prompts, warmup=1, seed=args.seed, progress=False))
    level = benchmark(config, tokenizer)["levels"][0]
    return {"output_tok_s": level["output_tok_s"], "ttft_p50_s": level["ttft_s"]["p50"],
            "itl_p50_s": level["itl_s"]["p50"], "ok": level["num_ok"], "sent": level["num_requests"],
            "mean_output_tokens": level["output_tokens"] / max(level["num_ok"], 1)}


def llamacpp_in_process(args, gguf: str) -> float | None:
    """llama.cpp's own decode rate on the file, in process ((LONG - SHORT) tokens over the time difference):
    the issue's bar for genserve's single stream over HTTP."""
    import subprocess

    python = Path(args.llamacpp_venv) / "bin/python"
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", LLAMACPP_SCRIPT, gguf, PROMPT, str(args.threads), str(SHORT), str(LONG),
                           "2"], capture_output=True, text=True, timeout=1200)
    if done.returncode:
        print(f"llama.cpp in process failed: {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["decode_tok_s"]


def median_of(rounds: list[dict], key: str, field: str) -> float | None:
    values = [r[key][field] for r in rounds if key in r and r[key].get(field) is not None]
    return statistics.median(values) if values else None


def write_markdown(doc: dict, path: Path) -> None:
    m, s = doc["machine"], doc["settings"]
    keys = sorted({k for r in doc["rounds"] for k in r})
    lines = ["# Quantized serving over HTTP: genserve Q4_1 GGUF vs llama.cpp, and 4-bit vs float", "",
             f"CPU: {m['cpu']} ({m['cpus']} CPUs; flags {', '.join(m['flags_of_interest'])}; L3 {m['l3']}). "
             f"{s['threads']} threads per server, {s['input_tokens']}-token prompts, {s['output_tokens']} output "
             f"tokens, streamed completions; `benchmarks/quant_http.py`, {len(doc['rounds'])} rounds, every "
             "server up for the whole run, arms interleaved within each round.", "",
             f"**The machine was shared** with other work (load average per round: "
             f"{', '.join(f'{a:.1f}-{b:.1f}' for a, b in doc['loadavg'])} on {m['cpus']} CPUs): absolute figures "
             "are low and noisy; the ratios within a round are the result.", ""]
    if doc.get("note"):
        lines += [doc["note"], ""]
    lines += ["| arm @ streams | output tok/s (median) | per round | TTFT p50 s | ITL p50 ms | ok/sent |",
              "|---|---|---|---|---|---|"]
    for key in keys:
        per = [r[key]["output_tok_s"] for r in doc["rounds"] if key in r]
        last = next(r[key] for r in reversed(doc["rounds"]) if key in r)
        itl = median_of(doc["rounds"], key, "itl_p50_s")
        lines.append(f"| {key} | {median_of(doc['rounds'], key, 'output_tok_s'):.1f} | "
                     f"{' / '.join(f'{v:.1f}' for v in per)} | {median_of(doc['rounds'], key, 'ttft_p50_s'):.2f} | "
                     f"{'-' if itl is None else f'{itl * 1e3:.0f}'} | {last['ok']}/{last['sent']} |")
    lines += ["", "Ratios (output tok/s, within each round; median over rounds):", ""]
    for name, (a, b) in doc["ratio_pairs"].items():
        per = [r[a]["output_tok_s"] / r[b]["output_tok_s"] for r in doc["rounds"] if a in r and b in r]
        if per:
            lines.append(f"- {name}: **x{statistics.median(per):.2f}** (rounds: {', '.join(f'{v:.2f}' for v in per)})")
    decode = [(r, rate) for r, rate in zip(doc["rounds"], doc.get("llamacpp_in_process", []), strict=False) if rate]
    if decode:
        lines += ["", "Decode rate at 1 stream: 1 / ITL p50 over HTTP (ITL: a request's mean time per token after its "
                  "first; p50 over the requests) against llama.cpp decoding the same file in "
                  f"process ({LONG} - {SHORT} tokens over the time difference, all servers idle meanwhile), same round:",
                  "", f"- llama.cpp in process: {' / '.join(f'{rate:.1f}' for _, rate in decode)} tok/s"]
        for key in keys:
            if key.endswith("@1"):
                per = [1 / r[key]["itl_p50_s"] / rate for r, rate in decode if r.get(key, {}).get("itl_p50_s")]
                if per:
                    lines.append(f"- {key} over HTTP / llama.cpp in process: **x{statistics.median(per):.2f}** "
                                 f"(rounds: {', '.join(f'{v:.2f}' for v in per)})")
    lines += ["", "Versions: " + "; ".join(f"{k}: {v}" for k, v in doc["versions"].items()), "",
              f"lscpu flags: {m['flags']}"]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default=None, help="the float arm's dtype; default: what --dtype auto picks here")
    p.add_argument("--genserve-venv", default=str(ROOT / ".venv"))
    p.add_argument("--llamacpp-venv", default="/work/peers/llamacpp")
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--gguf", default=None)
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--prompts-1", type=int, default=4, help="requests at 1 stream")
    p.add_argument("--prompts-32", type=int, default=32, help="requests at 32 streams")
    p.add_argument("--llamacpp-32-rounds", type=int, default=1,
                   help="rounds that run llama.cpp at 32 streams (it serves one request at a time: slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", default="1,32", help="stream counts to run (comma-separated, from 1 and 32)")
    p.add_argument("--arms", default=None, help="only these arms (comma-separated names; default: all)")
    p.add_argument("--note", default=None)
    p.add_argument("--log-dir", default="/tmp/genserve-quant-http")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dtype is None:
        from genserve.server import cpu_env

        args.dtype = "bfloat16" if cpu_env.has_native_bf16() else "float32"
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model_dir)
    run_levels = {int(level) for level in args.levels.split(",")}
    # only the arms this run measures: each server sizes its K/V pool from the free memory, and six did not fit
    chosen = set(args.arms.split(",")) if args.arms else None
    servers = [arm for arm in arms(args) if run_levels & set(arm.levels) and (chosen is None or arm.name in chosen)]
    doc = {"machine": machine(), "settings": vars(args), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "versions": {}, "rounds": [], "loadavg": [],
           "ratio_pairs": {"genserve Q4_1 / llama.cpp Q4_1, 1 stream": ("genserve-q4_1@1", "llamacpp-q4_1@1"),
                           "genserve Q4_1 int8 activations / llama.cpp Q4_1, 1 stream":
                               ("genserve-q4_1-int8act@1", "llamacpp-q4_1@1"),
                           "genserve Q4_1 8 steps per call / llama.cpp Q4_1, 1 stream":
                               ("genserve-q4_1-steps8@1", "llamacpp-q4_1@1"),
                           "genserve Q4_1 int8 activations, 8 steps per call / llama.cpp Q4_1, 1 stream":
                               ("genserve-q4_1-int8act-steps8@1", "llamacpp-q4_1@1"),
                           "genserve Q4_1 int8 activations / float activations, 1 stream":
                               ("genserve-q4_1-int8act@1", "genserve-q4_1@1"),
                           "genserve Q4_1 int8 activations / genserve float, 32 streams":
                               ("genserve-q4_1-int8act@32", f"genserve-{args.dtype}@32"),
                           "genserve Q4_1 / llama.cpp Q4_1, 32 streams": ("genserve-q4_1@32", "llamacpp-q4_1@32"),
                           f"genserve Q4_1 / genserve {args.dtype}, 32 streams":
                               ("genserve-q4_1@32", f"genserve-{args.dtype}@32"),
                           f"genserve Q4_1 computing in bf16 / genserve {args.dtype}, 32 streams":
                               ("genserve-q4_1-bf16@32", f"genserve-{args.dtype}@32"),
                           f"genserve Q4_1 in bf16, int8 activations / genserve {args.dtype}, 32 streams":
                               ("genserve-q4_1-bf16-int8act@32", f"genserve-{args.dtype}@32")}}
    try:
        # one server at a time: each times its kernels at startup, and timings taken beside another server's
        # start were noisy enough to pick the slower kernel (Zen 4, session 12)
        for arm in servers:
            arm.proc = start(arm, logs / f"{arm.name}.log")
            doc["versions"][arm.name] = versions(arm.python, arm.packages)
            problem = wait_ready(arm.proc, arm.url, 1200)
            if problem:
                print(f"{arm.name}: {problem}\n{(logs / f'{arm.name}.log').read_text()[-2000:]}", file=sys.stderr)
                return 1
        for index in range(args.rounds):
            results, load_before = {}, os.getloadavg()[0]
            for concurrency in sorted(int(level) for level in args.levels.split(",")):
                for arm in servers:
                    if concurrency not in arm.levels or (arm.name.startswith("llamacpp") and concurrency == 32
                                                         and index >= args.llamacpp_32_rounds):
                        continue
                    key = f"{arm.name}@{concurrency}"
                    results[key] = run_level(arm, concurrency, args, tokenizer)
                    print(f"[round {index + 1}] {key}: {results[key]}", file=sys.stderr, flush=True)
            doc["rounds"].append(results)
            if "1" in args.levels.split(","):
                doc.setdefault("llamacpp_in_process", []).append(llamacpp_in_process(args, str(gguf_path(args.gguf))))
            doc["loadavg"].append((load_before, os.getloadavg()[0]))
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "quant_http.json").write_text(json.dumps(doc, indent=2) + "\n")
            write_markdown(doc, RESULTS / "quant_http.md")
    finally:
        for arm in servers:
            if arm.proc is not None:
                stop(arm.proc)
    print((RESULTS / "quant_http.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
