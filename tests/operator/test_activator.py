"""The activator over real HTTP: holds requests while no server answers, then proxies (streams included)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from aiohttp import web

from genserve.operator.activator import ActivatorConfig, serve

CAP = 60  # seconds: only ends a stuck test; every wait polls for state (the machine may be busy)
HOLD = 4.0  # the activator's hold timeout in the queue test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loop:
    """An asyncio loop in a thread, so blocking clients can drive the servers in it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def start_backend(port: int) -> web.AppRunner:
    """A stand-in server pod: /health, a JSON /generate and an SSE /generate_stream."""
    async def health(request):
        return web.json_response({})

    async def generate(request):
        body = await request.json()
        return web.json_response({"generated_text": body["inputs"].upper()},
                                 headers={"x-request-id": request.headers.get("x-request-id", "")})

    async def stream(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("one", "two", "three"):
            await response.write(f"data: {json.dumps({'token': word})}\n\n".encode())
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture()
def setup():
    loop = Loop()
    backend_port = free_port()
    config = ActivatorConfig(target=f"http://127.0.0.1:{backend_port}", port=free_port(), metrics_port=free_port(),
                             hold_timeout_seconds=20, max_held_requests=3, health_interval_seconds=0.2)
    activator, runners = loop.run(serve(config, host="127.0.0.1"))
    state = {"backend": None}
    yield loop, config, backend_port, activator, state
    if state["backend"] is not None:
        loop.run(state["backend"].cleanup())
    loop.run(activator.close())
    for runner in runners:
        loop.run(runner.cleanup())
    loop.close()


def metrics(config: ActivatorConfig) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{config.metrics_port}/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}


def test_holds_until_the_server_is_up_then_proxies(setup):
    loop, config, backend_port, activator, state = setup
    url = f"http://127.0.0.1:{config.port}"
    # probes never wake the model: answered at once
    r = httpx.get(url + "/health")
    assert r.status_code == 503 and r.json()["error_type"] == "unhealthy"
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(httpx.post, url + "/generate", json={"inputs": "hi"}, headers={"x-request-id": "abc"},
                           timeout=30)
        deadline = time.monotonic() + CAP
        while metrics(config)["genserve_activator_requests_waiting"] != 1:
            assert time.monotonic() < deadline, "the request was not held"
            time.sleep(0.05)
        assert not held.done()
        state["backend"] = loop.run(start_backend(backend_port))
        response = held.result(timeout=CAP)
    assert response.status_code == 200 and response.json() == {"generated_text": "HI"}
    assert response.headers["x-request-id"] == "abc"
    m = metrics(config)
    assert m["genserve_activator_requests_waiting"] == 0 and m["genserve_activator_proxied_total"] == 1
    # streams pass through frame by frame
    with httpx.stream("POST", url + "/generate_stream", json={"inputs": "x"}) as r:
        frames = [line for line in r.iter_lines() if line.startswith("data:")]
        assert r.headers["content-type"].startswith("text/event-stream")
    assert [json.loads(f[5:])["token"] for f in frames] == ["one", "two", "three"]


def test_bounded_queue_and_timeout(setup):
    loop, config, _, activator, _ = setup
    url = f"http://127.0.0.1:{config.port}"
    # long enough that all three are held before the first times out, even on a busy machine
    config.hold_timeout_seconds = HOLD
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(httpx.post, url + "/generate", json={"inputs": "x"}, timeout=30) for _ in range(3)]
        deadline = time.monotonic() + CAP
        while metrics(config)["genserve_activator_requests_waiting"] != 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        over = httpx.post(url + "/generate", json={"inputs": "x"})
        assert over.status_code == 429 and over.json()["error_type"] == "overloaded"
        results = [f.result(timeout=CAP) for f in held]
    assert [r.status_code for r in results] == [503] * 3
    assert f"did not start within {HOLD:g} s" in results[0].json()["error"]
    assert metrics(config)["genserve_activator_timed_out_total"] == 3


def wait_metric(config: ActivatorConfig, name: str, value: float, timeout: float = CAP) -> None:
    deadline = time.monotonic() + timeout
    while metrics(config)[name] != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}: {metrics(config)}"
        time.sleep(0.05)


def test_probes_never_wake_and_abandoned_requests_stop_counting(setup):
    _, config, _, _, _ = setup
    url = f"http://127.0.0.1:{config.port}"
    for path in ("/", "/health", "/metrics"):
        assert httpx.get(url + path).status_code == 503
    assert metrics(config)["genserve_activator_requests_waiting"] == 0
    # a client that gives up while held no longer counts (it would otherwise wake the model)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/generate", json={"inputs": "x"}, timeout=httpx.Timeout(5, read=0.5))
    wait_metric(config, "genserve_activator_requests_waiting", 0)


def test_a_request_right_after_the_pods_left_is_held_not_refused(setup):
    loop, config, backend_port, activator, state = setup
    url = f"http://127.0.0.1:{config.port}"
    state["backend"] = loop.run(start_backend(backend_port))
    deadline = time.monotonic() + CAP
    while not httpx.get(f"http://127.0.0.1:{config.metrics_port}/healthz").json()["server_ready"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    async def pause_polling():  # the pods leave between two health polls
        activator._poller.cancel()

    async def resume_polling():
        activator._poller = asyncio.ensure_future(activator._poll_health())

    loop.run(pause_polling())
    loop.run(state["backend"].cleanup())
    state["backend"] = None
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, url + "/generate", json={"inputs": "late"}, timeout=30)
        wait_metric(config, "genserve_activator_requests_waiting", 1)  # held after the failed connect
        state["backend"] = loop.run(start_backend(backend_port))
        loop.run(resume_polling())
        response = held.result(timeout=CAP)
    assert response.status_code == 200 and response.json() == {"generated_text": "LATE"}
