"""Real HTTP, overload and slow clients (a tiny random Llama): a flood of twice --max-concurrent-requests
gets exactly the limit served and the rest a 429 at once, the waiting queue never holds more than the
limit, resident memory stays bounded; a slowloris head is cut off by the header timeout, a body that
stalls gets 408 after the body timeout, and a stream nobody reads is abandoned after --send-timeout (its
engine request aborted, its slot and KV blocks free)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from reliability_helpers import (
    AUTH,
    BODY_TIMEOUT,
    LIMIT,
    SEND_TIMEOUT,
    idle,
    metrics,
    peak_rss_bytes,
    rss_bytes,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HOLD = {"inputs": "Count from 1 to 1000: 1, 2, 3,", "parameters": {"max_new_tokens": 4000}}
CANCELLED = 'tgi_request_failure{err="cancelled"}'


@pytest.fixture(scope="module")
def server(hardened_server):
    return hardened_server  # see reliability_helpers: shared with test_security.py


async def _hold_or_429(client: httpx.AsyncClient, i: int, started: asyncio.Event, release: asyncio.Event):
    """A long stream or JSON request: returns its status; an accepted one is held until `release`."""
    if i % 2:
        r = await client.post("/generate", json=HOLD)  # refused at once, or served to the end
        return r.status_code
    async with client.stream("POST", "/generate_stream", json=HOLD) as r:
        if r.status_code == 200:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    started.set()
                    await release.wait()
                    break
        else:
            await r.aread()
            assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        return r.status_code


def test_flood_of_twice_the_limit_is_served_or_refused_at_once_with_bounded_memory(server):
    pid = server.proc.pid
    assert httpx.post(server.base_url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}},
                      headers=AUTH, timeout=120).status_code == 200
    rss_before = rss_bytes(pid)
    queue_sizes: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            m = metrics(server.base_url)
            queue_sizes.append(m["tgi_queue_size"] + m["tgi_batch_current_size"])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)

    async def flood() -> list[int]:
        release = asyncio.Event()
        started = [asyncio.Event() for _ in range(2 * LIMIT)]
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300, headers=AUTH,
                                     limits=httpx.Limits(max_connections=4 * LIMIT)) as client:
            tasks = [asyncio.ensure_future(_hold_or_429(client, i, started[i], release)) for i in range(2 * LIMIT)]
            # the refused ones answer while every accepted one is still generating: a 429 never waits
            done = set()
            while len(done) < LIMIT:
                finished, _ = await asyncio.wait(tasks, timeout=300, return_when=asyncio.FIRST_COMPLETED)
                assert finished, "no answer within the cap"
                done = {t for t in tasks if t.done()}
            refused = [t.result() for t in done]
            assert refused == [429] * LIMIT, refused
            sampler.start()
            await asyncio.sleep(0.5)
            release.set()
            for t in tasks:  # the held JSON requests: the client gives up on them (connections close)
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return refused

    asyncio.run(flood())
    stop.set()
    sampler.join(60)
    m = wait_for(lambda: idle(server.base_url), "an idle engine after the flood")
    assert m['tgi_request_failure{err="overloaded"}'] >= LIMIT
    assert queue_sizes and max(queue_sizes) <= LIMIT, queue_sizes  # the waiting queue is bounded by the limit
    growth = peak_rss_bytes(pid) - rss_before
    assert growth < 256 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB under the flood"


def test_slowloris_head_is_cut_off_and_the_server_keeps_serving(server):
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        slow.settimeout(1)
        closed = False
        deadline = time.monotonic() + 120
        while not closed and time.monotonic() < deadline:
            try:
                slow.sendall(b"X-Slow: 1\r\n")  # a header line now and then, never the end of the head
                closed = slow.recv(100) == b""
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
        assert closed, "the server kept a never-finished request head open"
    r = httpx.post(server.base_url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                   headers=AUTH, timeout=120)
    assert r.status_code == 200
    assert "request head took over 3 s" in server.log()


def test_a_stream_nobody_reads_is_abandoned_and_frees_its_slot(server):
    before = metrics(server.base_url).get(CANCELLED, 0)
    port = int(server.base_url.rsplit(":", 1)[1])
    # ~6 KB per event (100 top tokens): the socket buffers fill after a few hundred of the 4000 events
    body = json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 4000, "details": True,
                                                          "top_n_tokens": 100}}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: " + AUTH["Authorization"].encode() + b"\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        # never read: the send blocks, times out after 3 s, the request is aborted and counted as cancelled
        wait_for(lambda: metrics(server.base_url).get(CANCELLED, 0) == before + 1, "the abandoned stream", cap=300)
        m = wait_for(lambda: idle(server.base_url), "an idle engine")
        assert m["genserve_kv_cache_blocks_used"] == 0
        assert f"the client read nothing for {SEND_TIMEOUT:g} s: response abandoned" in server.log()
    finally:
        sock.close()
    r = httpx.post(server.base_url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                   headers=AUTH, timeout=120)
    assert r.status_code == 200


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(120)  # a generous cap: the 408 comes after BODY_TIMEOUT s of silence
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass
    return reply


def test_a_stalled_request_body_gets_408_and_is_closed_while_others_are_served(server):
    port = int(server.base_url.rsplit(":", 1)[1])
    head = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: " + AUTH["Authorization"].encode() + b"\r\n")
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        # a body announced as 100,000 bytes that stops after 1,000; a chunked body that stops after one chunk
        stalled[0].sendall(head + b"Content-Length: 100000\r\n\r\n" + b'{"inputs": "' + b"a" * 988)
        stalled[1].sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + b'c\r\n{"inputs": "\r\n')
        r = httpx.post(server.base_url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                       headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        for sock in stalled:
            status_line, _, rest = _read_until_closed(sock).partition(b"\r\n")
            headers, _, body = rest.partition(b"\r\n\r\n")
            assert status_line == b"HTTP/1.1 408 Request Timeout", status_line
            assert b"connection: close" in headers.lower()
            assert json.loads(body) == {"error": f"Request timeout: the request body stalled for over {BODY_TIMEOUT:g} s",
                                        "error_type": "request_timeout"}
    finally:
        for sock in stalled:
            sock.close()
    m = wait_for(lambda: idle(server.base_url), "an idle engine")  # nothing reached the engine
    assert m["genserve_kv_cache_blocks_used"] == 0
    assert server.log().count(f"the request body stalled for over {BODY_TIMEOUT:g} s") == 2
