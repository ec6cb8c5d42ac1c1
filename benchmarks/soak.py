"""Soak over real HTTP: 1,000 requests mixing routes, streaming and not, with client cancellations at
every stage (queued, prefilling, decoding), then check nothing leaked and nothing changed (run by hand).

Afterwards the server must hold zero KV blocks, tgi_queue_size 0 and tgi_batch_current_size 0, and
every answer that completed must equal the same request's uninterrupted run (greedy), taken first.
The server runs a tiny random Llama by default (--model for another); --max-batch-size 4 and a small
--max-batch-prefill-tokens make requests wait in the queue and long prompts prefill over many steps.

    .venv/bin/python benchmarks/soak.py                      # writes benchmarks/results/soak.{md,json}
    .venv/bin/python benchmarks/soak.py --requests 200 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import platform
import random
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from serve_process import ServeProcess, tiny_model

RESULTS = Path(__file__).parent / "results"
WORDS = "river mountain engine garden lantern market signal winter orbit copper harbor violin forest".split()
SERVER_ARGS = ["--max-concurrent-requests", "20", "--max-batch-size", "4", "--max-batch-prefill-tokens", "64",
               "--max-total-tokens", "1024", "--max-batch-total-tokens", "32768", "--json-output"]
STAGES = ("queued", "prefilling", "decoding")


@dataclass(frozen=True)
class Template:
    route: str
    stream: bool
    prompt: str
    max_new_tokens: int

    def body(self) -> dict:
        if self.route.startswith("/generate"):
            return {"inputs": self.prompt, "parameters": {"max_new_tokens": self.max_new_tokens, "details": True}}
        if self.route == "/v1/completions":
            return {"prompt": self.prompt, "max_tokens": self.max_new_tokens, "stream": self.stream,
                    "temperature": 0}  # OpenAI's default samples: greedy makes answers comparable
        return {"messages": [{"role": "user", "content": self.prompt}], "max_tokens": self.max_new_tokens,
                "stream": self.stream, "temperature": 0}


def templates(rng: random.Random) -> list[Template]:
    routes = [("/generate", False), ("/generate_stream", True), ("/v1/completions", False),
              ("/v1/completions", True), ("/v1/chat/completions", False), ("/v1/chat/completions", True)]
    out = []
    for i in range(36):
        route, stream = routes[i % len(routes)]
        long = i % 3 == 0  # ~600-token prompts: prefilled over ~10 steps of 64 tokens
        words = [rng.choice(WORDS) for _ in range(300 if long else rng.randint(3, 12))]
        out.append(Template(route, stream, " ".join(words), rng.randint(4, 32)))
    return out


class Answer:
    """What a client got: its status, and the answer's token ids (TGI) or text (OpenAI)."""

    def __init__(self):
        self.status: int | None = None
        self.tokens_seen = 0
        self.value = None
        self.error = None


async def send(client: httpx.AsyncClient, t: Template, answer: Answer, first_token: asyncio.Event) -> None:
    if not t.stream:
        r = await client.post(t.route, json=t.body())
        answer.status = r.status_code
        if r.status_code == 200:
            data = r.json()
            answer.value = ([x["id"] for x in data["details"]["tokens"]] if t.route == "/generate"
                            else data["choices"][0].get("text", data["choices"][0].get("message", {}).get("content")))
        return
    async with client.stream("POST", t.route, json=t.body()) as r:
        answer.status = r.status_code
        ids, text = [], []
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                answer.error = event
                continue
            if t.route == "/generate_stream":
                ids.append(event["token"]["id"])
            elif event.get("choices"):
                choice = event["choices"][0]
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
            answer.tokens_seen += 1
            first_token.set()
        answer.value = ids if t.route == "/generate_stream" else "".join(text)


async def run_one(client, t: Template, plan: str, rng: random.Random) -> tuple[Answer, bool]:
    """Send one request; cancel it at its planned stage. Returns (answer, cancelled by the client)."""
    answer, first = Answer(), asyncio.Event()
    task = asyncio.ensure_future(send(client, t, answer, first))
    if plan == "complete":
        await task
        return answer, False
    if plan == "queued":
        await asyncio.sleep(rng.uniform(0, 0.03))
    elif plan == "prefilling":
        await asyncio.wait([task], timeout=rng.uniform(0.03, 0.4))
    else:  # decoding: after some tokens of a stream, or a while into a plain request
        if t.stream:
            await asyncio.wait([task, asyncio.ensure_future(first.wait())], return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(rng.uniform(0, 0.2))
        else:
            await asyncio.wait([task], timeout=rng.uniform(0.2, 1.5))
    if task.done():
        return answer, False
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return answer, True


async def soak(url: str, num_requests: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    pool = templates(rng)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        references = []
        for t in pool:  # uninterrupted, one at a time
            a, _ = await run_one(client, t, "complete", rng)
            assert a.status == 200, (t, a.status)
            references.append(a.value)
        gate = asyncio.Semaphore(concurrency)
        stats = collections.Counter()
        status_codes = collections.Counter()
        mismatches = []

        async def one(i: int) -> None:
            plan = rng.choices(["complete", "queued", "prefilling", "decoding"], [55, 15, 15, 15])[0]
            candidates = [k for k, t in enumerate(pool)
                          if plan != "prefilling" or len(t.prompt) > 1000]
            k = rng.choice(candidates)
            t = pool[k]
            async with gate:
                answer, cancelled = await run_one(client, t, plan, rng)
            if cancelled:
                stats[f"cancel_tried_{plan}"] += 1
                stats[f"cancel_tried_{plan}_after_{'some' if answer.tokens_seen else 'no'}_tokens"] += 1
                return
            stats[f"status_{answer.status}"] += 1
            status_codes[str(answer.status)] += 1
            if answer.status == 200:
                if answer.error is not None:
                    stats["stream_error_events"] += 1
                elif answer.value != references[k]:
                    mismatches.append({"template": k, "route": t.route, "got": answer.value, "want": references[k]})
                else:
                    stats["completed_equal_to_uninterrupted"] += 1

        started = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(num_requests)])
        elapsed = time.perf_counter() - started
    return {"stats": dict(stats), "status_codes": dict(status_codes), "mismatches": mismatches,
            "elapsed_s": round(elapsed, 1), "templates": len(pool)}


def server_cancellations(log: str) -> int:
    """Requests the server itself logged as cancelled by their client (status 499, JSON log lines)."""
    count = 0
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            count += entry.get("target") == "genserve.request" and (entry.get("fields") or {}).get("status") == 499
    return count


def wait_idle(server: ServeProcess, cap: float = 300) -> dict:
    deadline = time.monotonic() + cap
    while True:
        m = server.metrics()
        if (m["genserve_kv_cache_blocks_used"] == 0 and m["tgi_queue_size"] == 0
                and m["tgi_batch_current_size"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def write_report(result: dict, out: Path, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    s, m = result["stats"], result["after"]
    tried = {stage: s.get(f"cancel_tried_{stage}", 0) for stage in STAGES}
    lines = [
        "# Soak: requests with client cancellations at every stage",
        "",
        f"`benchmarks/soak.py --requests {args.requests} --concurrency {args.concurrency} --seed {args.seed}` "
        f"on {result['cpu']} ({result['model']}), {result['elapsed_s']} s. Server flags: "
        f"`{' '.join(SERVER_ARGS)}`. {result['templates']} request templates (6 route/stream kinds, a third "
        "with ~600-token prompts), each first run uninterrupted as the reference.",
        "",
        "| figure | value |", "|---|---|",
        f"| requests sent | {args.requests} |",
        *[f"| answers with status {code} | {n} |" for code, n in sorted(result["status_codes"].items())],
        f"| completed answers equal to their uninterrupted run | {s.get('completed_equal_to_uninterrupted', 0)} |",
        f"| completed answers that differ | {len(result['mismatches'])} |",
        f"| stream error events | {s.get('stream_error_events', 0)} |",
        f"| cancellations tried | {sum(tried.values())} |",
        *[f"| - planned while {stage} (client had seen no token / some) | {tried[stage]} "
          f"({s.get(f'cancel_tried_{stage}_after_no_tokens', 0)} / {s.get(f'cancel_tried_{stage}_after_some_tokens', 0)}) |"
          for stage in STAGES],
        f"| cancelled requests the server logged (499; the rest had ended first) | {result['server_cancelled']} |",
        f"| KV blocks in use after (leaked) | {m['genserve_kv_cache_blocks_used']:.0f} |",
        f"| tgi_queue_size after | {m['tgi_queue_size']:.0f} |",
        f"| tgi_batch_current_size after | {m['tgi_batch_current_size']:.0f} |",
        f"| server exit code after SIGTERM | {result['exit_code']} |",
        "",
        "A cancellation is the client closing its connection: `queued` 0-30 ms after sending (the batch is",
        "full, so most wait in the queue), `prefilling` 30-400 ms into a ~600-token prompt before its first",
        "token, `decoding` after a stream's first token (or 0.2-1.5 s into a plain request). A request that",
        "ended before its planned cancellation counts as an answer. 429s come from concurrency above",
        "--max-concurrent-requests.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--model", type=Path, default=None, help="a model folder (default: a tiny random Llama)")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="genserve-soak-"))
    model = args.model or tiny_model(work / "tiny-llama")
    server = ServeProcess(model, work / "serve.log", *SERVER_ARGS)
    try:
        result = asyncio.run(soak(server.url, args.requests, args.concurrency, args.seed))
        result["after"] = wait_idle(server)
        result["server_cancelled"] = server_cancellations(server.log())
    finally:
        result_code = server.stop()
    result.update(exit_code=result_code, cpu=cpu_model(), model="tiny random Llama" if args.model is None
                  else str(args.model))
    write_report(result, args.out, args)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
