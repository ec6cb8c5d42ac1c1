"""Resident memory per tensor-parallel rank: each rank should hold about 1/N of the weights (run by hand).

For each shard count, start an engine (rank 0 in this process, ranks 1..N-1 spawned), then read every
rank's /proc/<pid>/status: RssAnon (private memory: weights, KV cache, torch's own heap), VmHWM (peak
resident, including file pages of the safetensors mmap while it was open), and each rank's weight
bytes. A bare process that imported the same modules gives the baseline. Writes a markdown table.

    .venv/bin/python benchmarks/tp_memory.py --shards 1 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BASELINE = ("import time, torch, transformers; import genserve.server.engine, genserve.server.model_runner; "
            "print(open('/proc/self/status').read(), flush=True)")


def status(pid: int | str) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def parse_status(text: str) -> dict[str, int]:
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in text.splitlines())
            if v.strip().endswith("kB")}


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def measure(num_shard: int, model_id: str | None, dtype: str) -> list[dict]:
    """Per rank: weight MiB, RssAnon and VmHWM after start-up (a tiny KV cache: 1024 tokens)."""
    from genserve.server import distributed
    from genserve.server.config import EngineConfig
    from genserve.server.engine import LLMEngine

    peak = [0]
    done = threading.Event()

    def sample_anon() -> None:  # rank 0's private memory while it loads: catches a transient full copy
        while not done.wait(0.005):
            peak[0] = max(peak[0], status("self")["RssAnon"])

    sampler = threading.Thread(target=sample_anon)
    sampler.start()
    engine = LLMEngine(EngineConfig(model_id=model_id, dtype=dtype, device="cpu", num_shard=num_shard,
                                    max_total_tokens=1024, max_batch_total_tokens=1024, num_threads=1))
    done.set()
    sampler.join()
    time.sleep(1)
    pids = ["self"] + [p.pid for p in distributed._workers]
    rows = [{"rank": rank, "weights": engine.runner.weight_bytes, "peak_anon": peak[0] if rank == 0 else None,
             **status(pid)} for rank, pid in enumerate(pids)]
    engine.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--model-id", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if len(args.shards) > 1:
        # one process per shard count: a process group is set up once per process
        for n in args.shards:
            subprocess.run([sys.executable, __file__, "--shards", str(n), "--dtype", args.dtype]
                           + (["--model-id", args.model_id] if args.model_id else []), check=True)
        return
    num_shard = args.shards[0]
    base = parse_status(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                       check=True).stdout)
    rows = measure(num_shard, args.model_id, args.dtype)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "tp_memory.md"
    lines = [] if out.exists() else [
        "# Resident memory per tensor-parallel rank",
        "",
        "`benchmarks/tp_memory.py`: CPU, gloo, KV cache of 1024 tokens. MiB. `RssAnon - base` is private",
        "memory above a process that imported the same modules (torch, transformers, genserve) and loaded",
        "nothing. `VmHWM` is the peak resident set, file pages of the mmapped safetensors included.",
        "Peak RssAnon while loading is sampled every 5 ms on rank 0 only (the engine process).",
        "",
        "| model | dtype | num_shard | rank | weights | RssAnon | RssAnon - base | peak RssAnon while loading | VmHWM "
        "| base RssAnon |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    model = args.model_id or "SmolLM2-135M-Instruct"
    for r in rows:
        lines.append(f"| {model} | {args.dtype} | {num_shard} | {r['rank']} | {mib(r['weights'])} | "
                     f"{mib(r['RssAnon'])} | {mib(r['RssAnon'] - base['RssAnon'])} | "
                     f"{mib(r['peak_anon']) if r['peak_anon'] else '-'} | {mib(r['VmHWM'])} | "
                     f"{mib(base['RssAnon'])} |")
        print(lines[-1])
    with out.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
