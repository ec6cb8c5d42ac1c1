"""Flood over real HTTP: rounds of twice --max-concurrent-requests sent at once (half streamed); the server's
resident memory is sampled from /proc during each round (run by hand).

Shows that past the limit requests get a 429 at once (its latency beside the served ones'), that the
waiting queue never holds more than the limit, and that RSS stays bounded: the peak does not grow
from round to round. Writes benchmarks/results/flood_rss.{md,json}.

    .venv/bin/python benchmarks/flood_rss.py --limit 64 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from serve_process import ServeProcess, tiny_model
from soak import cpu_model

RESULTS = Path(__file__).parent / "results"


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def one(client: httpx.AsyncClient, i: int, max_new: int) -> tuple[int, float]:
    body = {"inputs": f"Request {i}: count from 1 to 100: 1, 2, 3,", "parameters": {"max_new_tokens": max_new}}
    started = time.perf_counter()
    if i % 2:
        r = await client.post("/generate", json=body)
        return r.status_code, time.perf_counter() - started
    async with client.stream("POST", "/generate_stream", json=body) as r:
        async for _ in r.aiter_bytes():
            pass
        return r.status_code, time.perf_counter() - started


async def flood(url: str, n: int, max_new: int) -> list[tuple[int, float]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        return await asyncio.gather(*[one(client, i, max_new) for i in range(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=64, help="--max-concurrent-requests")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, default=None, help="a model folder (default: a tiny random Llama)")
    parser.add_argument("--out", type=Path, default=RESULTS / "flood_rss")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="genserve-flood-"))
    model = args.model or tiny_model(work / "tiny-llama")
    server = ServeProcess(model, work / "serve.log", "--max-concurrent-requests", str(args.limit),
                          "--max-batch-size", str(max(args.limit // 4, 1)), "--max-total-tokens", "1024",
                          "--max-batch-total-tokens", "65536")
    pid = server.proc.pid
    rounds = []
    try:
        asyncio.run(flood(server.url, 4, 4))  # warm: the first requests allocate what every later one reuses
        baseline = status_kib(pid, "VmRSS")
        for r in range(args.rounds):
            samples, queue, stop = [], [], threading.Event()

            def sample(samples=samples, queue=queue, stop=stop) -> None:
                while not stop.is_set():
                    samples.append(status_kib(pid, "VmRSS"))
                    m = server.metrics()
                    queue.append(m["tgi_queue_size"] + m["tgi_batch_current_size"])
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            answers = asyncio.run(flood(server.url, 2 * args.limit, args.max_new_tokens))
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
            codes = collections.Counter(code for code, _ in answers)
            latency = {code: [s for c, s in answers if c == code] for code in codes}
            rounds.append({
                "round": r + 1, "sent": len(answers), "status_codes": {str(k): v for k, v in sorted(codes.items())},
                "peak_rss_mib": round(max(samples) / 1024, 1), "max_in_queue_and_batch": max(queue),
                "median_s": {str(c): round(statistics.median(v), 3) for c, v in latency.items()},
                "max_s": {str(c): round(max(v), 3) for c, v in latency.items()}, "elapsed_s": round(elapsed, 1)})
            print(rounds[-1])
        after = server.metrics()
        high_water = status_kib(pid, "VmHWM")
    finally:
        exit_code = server.stop()
    result = {"limit": args.limit, "cpu": cpu_model(), "baseline_rss_mib": round(baseline / 1024, 1),
              "vm_hwm_mib": round(high_water / 1024, 1), "rounds": rounds, "exit_code": exit_code,
              "kv_blocks_used_after": after["genserve_kv_cache_blocks_used"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Flood: twice --max-concurrent-requests at once, resident memory of the server",
        "",
        f"`benchmarks/flood_rss.py --limit {args.limit} --rounds {args.rounds} --max-new-tokens {args.max_new_tokens}`"
        f" on {result['cpu']}, tiny random Llama, CPU. Each round sends {2 * args.limit} requests at once (half "
        "streamed); RSS (VmRSS) sampled every 50 ms from /proc.",
        "",
        f"Baseline RSS after warm-up: {result['baseline_rss_mib']} MiB; high-water mark over the whole run (VmHWM): "
        f"{result['vm_hwm_mib']} MiB; KV blocks in use after: {result['kv_blocks_used_after']:.0f}; "
        f"exit code after SIGTERM: {exit_code}.",
        "",
        "| round | sent | answers by status | peak RSS MiB | max queue+batch | median s (200 / 429) | max s (200 / 429) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['round']} | {r['sent']} | {', '.join(f'{k}: {v}' for k, v in r['status_codes'].items())} | "
          f"{r['peak_rss_mib']} | {r['max_in_queue_and_batch']:.0f} | {r['median_s'].get('200', '-')} / "
          f"{r['median_s'].get('429', '-')} | {r['max_s'].get('200', '-')} / {r['max_s'].get('429', '-')} |"
          for r in rounds],
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
