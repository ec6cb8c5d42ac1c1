"""Real HTTP (`genserve serve`, SmolLM2): a client that goes away mid-generation leaves the batch and the
KV cache empty, on every generation route, streamed or not; a soak of clients timing out at random too."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from http_server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

COUNTING = "Count from 1 to 1000: 1, 2, 3, 4,"
LONG = 900
CHAT = [{"role": "user", "content": COUNTING}]
# (route, body) for every generation route, streamed and not
ROUTES = [
    ("/generate", {"inputs": COUNTING, "parameters": {"max_new_tokens": LONG}}),
    ("/generate_stream", {"inputs": COUNTING, "parameters": {"max_new_tokens": LONG}}),
    ("/", {"inputs": COUNTING, "parameters": {"max_new_tokens": LONG}}),
    ("/", {"inputs": COUNTING, "parameters": {"max_new_tokens": LONG}, "stream": True}),
    ("/v1/completions", {"prompt": COUNTING, "max_tokens": LONG, "ignore_eos": True}),
    ("/v1/completions", {"prompt": COUNTING, "max_tokens": LONG, "ignore_eos": True, "stream": True}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": LONG, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": LONG, "ignore_eos": True, "stream": True}),
    ("/invocations", {"inputs": COUNTING, "parameters": {"max_new_tokens": LONG}}),
    ("/invocations", {"inputs": COUNTING, "parameters": {"max_new_tokens": LONG}, "stream": True}),
    ("/invocations", {"messages": CHAT, "max_tokens": LONG, "ignore_eos": True}),
    ("/invocations", {"messages": CHAT, "max_tokens": LONG, "ignore_eos": True, "stream": True}),
    ("/vertex", {"instances": [{"inputs": COUNTING, "parameters": {"max_new_tokens": LONG}}]}),
]
CANCELLED = 'tgi_request_failure{err="cancelled"}'
# short in the suite; benchmarks/soak.py runs 1,000 with cancellations at every stage
SOAK_REQUESTS = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("serve-disconnect"))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    out = {}
    for line in (await client.get("/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def _wait_for(client: httpx.AsyncClient, predicate, cap: float = 60.0) -> dict[str, float]:
    """Poll /metrics until `predicate(metrics)`; generous cap for a busy machine."""
    deadline = time.monotonic() + cap
    while True:
        m = await _metrics(client)
        if predicate(m):
            return m
        assert time.monotonic() < deadline, {k: v for k, v in m.items() if "batch" in k or "kv_cache" in k}
        await asyncio.sleep(0.05)


def _idle(m: dict[str, float]) -> bool:
    return m["tgi_batch_current_size"] == 0 and m["genserve_kv_cache_blocks_used"] == 0


async def _post(client: httpx.AsyncClient, route: str, body: dict) -> None:
    if body.get("stream"):
        async with client.stream("POST", route, json=body) as r:
            async for _ in r.aiter_bytes():
                pass
    else:
        await client.post(route, json=body)


@pytest.mark.parametrize("route, body", ROUTES, ids=[f"{r}-{'messages' if 'messages' in b else 'inputs'}"
                                                    f"{'-stream' if b.get('stream') else ''}" for r, b in ROUTES])
async def test_client_gone_mid_generation_frees_batch_and_kv(server, route, body):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as probe:
        before = await _wait_for(probe, _idle)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            call = asyncio.ensure_future(_post(client, route, body))
            # mid-generation: in the batch, with KV blocks held
            await _wait_for(probe, lambda m: m["tgi_batch_current_size"] >= 1
                            and m["genserve_kv_cache_blocks_used"] > 0 and not call.done())
            call.cancel()  # what a client timeout does: the connection is closed
            await asyncio.gather(call, return_exceptions=True)
        after = await _wait_for(probe, _idle)
        assert after.get(CANCELLED, 0) == before.get(CANCELLED, 0) + 1


async def test_soak_random_client_timeouts_end_with_empty_cache(server):
    rng = random.Random(11)
    short = [
        ("/generate", lambda n: {"inputs": COUNTING, "parameters": {"max_new_tokens": n}}),
        ("/generate_stream", lambda n: {"inputs": COUNTING, "parameters": {"max_new_tokens": n}}),
        ("/v1/completions", lambda n: {"prompt": COUNTING, "max_tokens": n, "stream": rng.random() < 0.5}),
        ("/v1/chat/completions", lambda n: {"messages": CHAT, "max_tokens": n, "stream": rng.random() < 0.5}),
    ]
    gate = asyncio.Semaphore(16)
    outcomes = {"done": 0, "timed_out": 0}

    async def one(route, body, timeout):
        async with gate, httpx.AsyncClient(base_url=server.base_url, timeout=timeout) as client:
            try:
                await _post(client, route, body)
                outcomes["done"] += 1
            except httpx.TimeoutException:
                outcomes["timed_out"] += 1

    jobs = []
    for _ in range(SOAK_REQUESTS):
        route, make = rng.choice(short)
        jobs.append(one(route, make(rng.randint(4, 24)), rng.uniform(0.05, 3.0)))
    await asyncio.gather(*jobs)
    assert sum(outcomes.values()) == SOAK_REQUESTS and outcomes["timed_out"] > 0, outcomes
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as probe:
        m = await _wait_for(probe, _idle)
        assert m["genserve_kv_cache_usage_ratio"] == 0
        r = await probe.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.text
