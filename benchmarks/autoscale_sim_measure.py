"""Measure the server figures the autoscaling simulation runs on: start-up to a healthy /health and the decode
step time at batch 1, 8 and 32 of a real `genserve serve` (`python benchmarks/autoscale_sim.py --measure`)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path


def _chat(url: str, max_tokens: int) -> int:
    # a prompt that makes the instruct model write until the token limit
    body = json.dumps({"model": "default", "max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and the sea."}]})
    request = urllib.request.Request(url + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=600).read())["usage"]["completion_tokens"]


def measure_server(genserve: str, out: Path, max_tokens: int = 64) -> dict:
    """Start-up time to a healthy /health and the decode step time at batch 1, 8 and 32 of a real server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url, start = f"http://127.0.0.1:{port}", time.perf_counter()
    proc = subprocess.Popen([genserve, "serve", "--port", str(port), "--hostname", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
            if proc.poll() is not None or time.perf_counter() - start > 600:
                raise SystemExit("genserve serve did not become healthy")
        ready_seconds = time.perf_counter() - start
        _chat(url, 8)
        batches = []
        for batch in (1, 8, 32):
            counts: list[int] = []
            threads = [threading.Thread(target=lambda c=counts: c.append(_chat(url, max_tokens))) for _ in range(batch)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            # the whole batch decodes together: wall time over tokens per request is the step time
            batches.append({"batch": batch, "seconds": round(elapsed, 4), "tokens": sum(counts),
                            "step_seconds": round(elapsed / (sum(counts) / batch), 4)})
    finally:
        proc.terminate()
        proc.wait(60)
    figures = {"server_ready_seconds": round(ready_seconds, 2), "max_new_tokens": max_tokens, "batches": batches,
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "model": "default (SmolLM2-135M-Instruct), CPU"}
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures
