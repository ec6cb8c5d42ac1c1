"""The autoscaler against a real `genserve serve` under load (the default SmolLM2 model on CPU)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from harness import add_ready_pod, replicas, tgs_body, tgs_status, wait_for
from kubernetes import client

GENSERVE = Path(sys.executable).with_name("genserve")
GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_serve_command() -> bool:
    try:
        return subprocess.run([str(GENSERVE), "serve", "--help"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def real_server():
    if not has_serve_command():
        pytest.skip("`genserve serve` does not exist yet")
    port = free_port()
    # a batch of 2 makes a queue form under a modest load on a CPU
    proc = subprocess.Popen([str(GENSERVE), "serve", "--port", str(port), "--hostname", "127.0.0.1",
                             "--max-batch-size", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"genserve serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            return urllib.request.urlopen(url + "/health", timeout=2).status == 200
        except OSError:
            return False
    try:
        wait_for(healthy, timeout=180, interval=0.5, what="genserve serve /health")
        yield port, url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def generate(url: str) -> None:
    body = json.dumps({"inputs": "Tell me a long story about a lighthouse keeper.",
                       "parameters": {"max_new_tokens": 48}}).encode()
    request = urllib.request.Request(url + "/generate", body, {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=120).read()


@pytest.mark.slow
def test_real_server_queue_scales_the_deployment_up(operator, api, cluster, namespace, real_server):
    port, url = real_server
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tgs_body(
        "smol", {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "shards": 0, "autoscaling": {
            "enabled": True, "minReplicas": 1, "maxReplicas": 4, "targetQueueDepth": 1, "intervalSeconds": 1}}))
    wait_for(lambda: cluster.get("apps/v1/deployments", namespace, "smol"), what="the Deployment")
    add_ready_pod(api, namespace, "smol", "smol-0", port)
    wait_for(lambda: "queueDepth" in tgs_status(api, namespace, "smol"), what="a first scrape of the real server")
    assert replicas(cluster, namespace, "smol") == 1  # idle: stays at minReplicas

    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            generate(url)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(12)]
    for w in workers:
        w.start()
    try:
        # the decision is read when it is made: once the load stops, later ticks may recommend fewer
        decision = wait_for(lambda: (d := tgs_status(api, namespace, "smol").get("lastScaleDecision"))
                            and d["reason"] == "ScaleUp" and d, interval=0.2,
                            what="a scale-up from the real server's queue")
        assert decision["fromReplicas"] == 1 and decision["toReplicas"] > 1
        assert "queue" in decision["message"]
        wait_for(lambda: replicas(cluster, namespace, "smol") >= decision["toReplicas"], interval=0.2,
                 what="the Deployment at the decided replicas")
    finally:
        stop.set()
        for w in workers:
            w.join(150)
