"""Load levels: closed loop (N requests in flight) and open loop (Poisson arrivals at a rate)."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

from genserve.server.benchmark.client import RequestResult, connect_problem, send_request
from genserve.server.benchmark.config import BenchmarkConfig, BenchmarkError
from genserve.server.benchmark.workload import Prompt, Workload


@dataclass(slots=True)
class LevelRun:
    mode: str  # "concurrency" (closed loop) or "rate" (open loop, requests/s)
    value: float
    duration: float
    results: list[RequestResult] = field(default_factory=list)


@dataclass(slots=True)
class BenchmarkRun:
    config: BenchmarkConfig
    model: str | None
    started_at: float
    levels: list[LevelRun] = field(default_factory=list)


def poisson_schedule(rate: float, num: int, seed: int = 0) -> list[float]:
    """Send offsets in seconds of a Poisson process at `rate` requests/s; the first request goes at 0."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(num):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


def new_client(timeout: float) -> httpx.AsyncClient:
    # trust_env=False: a proxy from the environment would sit in every measurement
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), trust_env=False,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def wait_ready(client: httpx.AsyncClient, url: str, wait: float) -> None:
    """Until GET /health (or /v1/models where there is no /health) answers 200, for at most `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            r = await client.get(url + "/health", timeout=5)
            if r.status_code == 404:
                r = await client.get(url + "/v1/models", timeout=5)
            if r.status_code == 200:
                return
            problem = f"HTTP {r.status_code} from {r.request.url.path}"
        except httpx.ConnectError as e:
            problem = f"cannot connect ({connect_problem(e)})"
        except httpx.HTTPError as e:
            problem = f"{type(e).__name__} {e}".strip()
        left = deadline - time.monotonic()
        if left <= 0:
            hint = "" if wait else "; is the server running? --wait-ready SECONDS waits for it"
            raise BenchmarkError(f"{url} is not ready after {wait:g} s: {problem}{hint}")
        await asyncio.sleep(min(1.0, left))


async def served_model(client: httpx.AsyncClient, url: str) -> str | None:
    try:
        r = await client.get(url + "/v1/models", timeout=5)
        return r.json()["data"][0]["id"] if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not enabled, leave=True)


async def closed_loop(client, config: BenchmarkConfig, prompts: list[Prompt], concurrency: int,
                      progress: bool = False) -> LevelRun:
    """`concurrency` workers, each sending its next request as soon as its last one ends."""
    queue = list(reversed(prompts))
    results: list[RequestResult] = []
    bar = _progress(len(prompts), f"{config.label} concurrency {concurrency}", progress)
    origin = time.perf_counter()

    async def worker():
        while queue:
            results.append(await send_request(client, config.url, queue.pop(), config.request, origin))
            bar.update(1)

    with bar:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    return LevelRun("concurrency", concurrency, time.perf_counter() - origin,
                    sorted(results, key=lambda r: r.sent_at))


async def open_loop(client, config: BenchmarkConfig, prompts: list[Prompt], rate: float,
                    progress: bool = False, seed: int = 0) -> LevelRun:
    """Requests sent at Poisson arrival times whatever the server's state (no cap on those in flight)."""
    schedule = poisson_schedule(rate, len(prompts), seed)
    bar = _progress(len(prompts), f"{config.label} rate {rate:g}/s", progress)
    origin = time.perf_counter()

    async def one(prompt: Prompt) -> RequestResult:
        result = await send_request(client, config.url, prompt, config.request, origin)
        bar.update(1)
        return result

    tasks = []
    with bar:
        for offset, prompt in zip(schedule, prompts, strict=True):
            delay = origin + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(prompt)))
        results = await asyncio.gather(*tasks)
    return LevelRun("rate", rate, time.perf_counter() - origin, list(results))


async def run_benchmark(config: BenchmarkConfig, tokenizer=None) -> BenchmarkRun:
    """Check the endpoint, then run each concurrency level and each request rate in turn."""
    load = config.load
    async with new_client(config.request.request_timeout) as client:
        await wait_ready(client, config.url, config.wait_ready)
        if config.request.model is None and config.request.api != "tgi":
            config.request.model = await served_model(client, config.url)
        try:
            workload = Workload(config.workload, tokenizer)
        except (OSError, ValueError) as e:
            raise BenchmarkError(str(e).splitlines()[0]) from None
        run = BenchmarkRun(config, config.request.model, time.time())
        if load.warmup:
            warm = await closed_loop(client, config, workload.peek(load.warmup), 1)
            if not any(r.ok for r in warm.results):
                r = warm.results[0]
                raise BenchmarkError(f"warm-up request failed ({r.error}): {r.error_message}")
        for c in load.concurrency:
            run.levels.append(await closed_loop(client, config, workload.take(load.prompts_for("concurrency", c)),
                                                c, load.progress))
        for i, rate in enumerate(load.request_rates):
            run.levels.append(await open_loop(client, config, workload.take(load.prompts_for("rate", rate)),
                                              rate, load.progress, seed=load.seed + i))
    return run
