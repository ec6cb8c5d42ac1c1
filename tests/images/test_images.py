"""The built images, run rather than parsed: the CPU server image serves the default model over HTTP, the
operator image logs in to the emulated API server and reconciles. `make images` builds them with buildah;
without buildah or the images every test here skips. No Docker engine: buildah runs them (chroot isolation,
the host's network), which is why a free host port is chosen for each."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

TESTS = Path(__file__).resolve().parents[1]
for helpers in (TESTS / "server", TESTS / "operator"):  # http_server (reference), harness (the emulator)
    if str(helpers) not in sys.path:
        sys.path.append(str(helpers))

SERVER_IMAGE = os.environ.get("GENSERVE_SERVER_IMAGE", "localhost/genserve-server:dev")
OPERATOR_IMAGE = os.environ.get("GENSERVE_OPERATOR_IMAGE", "localhost/genserve-operator:dev")
STORAGE = ["--storage-driver", os.environ.get("STORAGE_DRIVER", "vfs")]  # what scripts/images/build.sh uses
PROMPT, N = "The three primary colors are", 16

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["buildah", *STORAGE, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} failed:\n{result.stderr}")
    return result


class Phases:
    """Wall time of each step, printed by the tests: most of it is copying images and starting them."""

    def __init__(self) -> None:
        self.last, self.spent = time.monotonic(), []

    def mark(self, what: str) -> None:
        now = time.monotonic()
        self.spent.append(f"{what}: {now - self.last:.0f} s")
        self.last = now

    def __str__(self) -> str:
        return "; ".join(self.spent)


def require_image(image: str) -> None:
    if os.environ.get("GENSERVE_SKIP_IMAGE_TESTS") == "1":
        pytest.skip("GENSERVE_SKIP_IMAGE_TESTS=1")
    if not shutil.which("buildah"):
        pytest.skip("buildah is not installed (apt-get install buildah debootstrap), so `make images` cannot "
                    "build the images this test runs")
    if buildah("inspect", "--type", "image", image, check=False).returncode != 0:
        pytest.skip(f"{image} is not built: run `make images`")


@contextmanager
def container(image: str) -> Iterator[str]:
    """A working container from the image (vfs copies its tree), removed afterwards."""
    name = f"genserve-test-{uuid.uuid4().hex[:8]}"
    buildah("from", "--pull=never", "--name", name, image)
    try:
        yield name
    finally:
        buildah("rm", name, check=False)


@contextmanager
def running(ctr: str, command: list[str], log_path: Path, volumes: dict[str, str] = (),
            env: dict[str, str] = ()) -> Iterator[subprocess.Popen]:
    """`buildah run` the command as the image's user, in its own process group (stopped as a whole)."""
    args = ["buildah", *STORAGE, "run", "--isolation", "chroot"]
    for host, inside in dict(volumes).items():
        args += ["--volume", f"{host}:{inside}"]
    for key, value in dict(env).items():
        args += ["--env", f"{key}={value}"]
    with log_path.open("w") as log:
        proc = subprocess.Popen([*args, ctr, "--", *command], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 600) -> httpx.Response:
    """Polls until the URL answers 200; fails early when the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not 200 after {timeout} s:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(1)


def saved_kernels(image: str) -> Path:
    """Where the kernels this image compiled on its first test run are kept, as a pod's cache volume keeps
    them across restarts: compiling them takes minutes at low priority on a loaded 2-core machine."""
    from genserve.server.model_files import cache_dir

    image_id = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", image).stdout.strip()
    return cache_dir() / "image-tests" / image_id[:16] / "kernels"


def cache_volume(tmp_path: Path, kernels: Path) -> Path:
    """GENSERVE_CACHE as the operator's init step leaves it on the pod's volume: the default model converted
    under models/, not weights baked into the image (an image per model, rebuilt and pulled for each weight
    change). Copied, and opened to the image's uid 10001 (the host's cache files may be root-only)."""
    from genserve.server.model_files import default_model_dir, is_model_dir

    source = default_model_dir()
    if not is_model_dir(source):
        pytest.skip(f"the default model is not prepared at {source}: run `make model`")
    volume = tmp_path / "genserve"
    shutil.copytree(source, volume / "models" / source.name, copy_function=shutil.copyfile)
    if kernels.is_dir():
        shutil.copytree(kernels, volume / "kernels", copy_function=shutil.copyfile)
    for path in (volume, *volume.rglob("*")):
        path.chmod(0o777 if path.is_dir() else 0o644)  # the server writes its compiled kernels there too
    return volume


def test_server_image_serves_the_default_model(tmp_path):
    require_image(SERVER_IMAGE)
    from http_server import free_port, greedy_reference, text_ids

    kernels = saved_kernels(SERVER_IMAGE)
    volume = cache_volume(tmp_path, kernels)
    port = free_port()
    # The image's entrypoint, plus flags for a small KV cache (fast start on a shared CPU box); float32 so
    # the greedy tokens equal transformers' float32 reference exactly. The volume goes to /data/genserve,
    # the image's GENSERVE_CACHE: buildah run puts its own volume over a bind mount at exactly /data (the
    # image's VOLUME).
    command = ["genserve", "serve", "--port", str(port), "--dtype", "float32", "--device", "cpu",
               "--max-total-tokens", "1024", "--max-batch-total-tokens", "16384"]
    log = tmp_path / "server.log"
    phases = Phases()
    with container(SERVER_IMAGE) as ctr:
        phases.mark("buildah from (vfs copies the image)")
        with running(ctr, command, log, volumes={str(volume): "/data/genserve"},
                     env={"OMP_NUM_THREADS": "2"}) as proc:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/health", proc, log)
            phases.mark("start-up to /health 200")
            info = httpx.get(base + "/info", timeout=30).json()
            assert info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct", info
            r = httpx.post(base + "/v1/completions", timeout=300, json={
                "model": "tgi", "prompt": PROMPT, "max_tokens": N, "temperature": 0})
            assert r.status_code == 200, r.text
            text, tokens = greedy_reference(text_ids(PROMPT), N)
            choice = r.json()["choices"][0]
            assert choice["text"] == text
            assert r.json()["usage"]["completion_tokens"] == len(tokens)
            phases.mark("completion and its reference")
    if not kernels.is_dir() and (volume / "kernels").is_dir():
        shutil.copytree(volume / "kernels", kernels)
    phases.mark("stop and buildah rm")
    print(phases)  # shown with -s or -rP: where the time of an image test goes
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-4000:]


def test_operator_image_logs_in_and_reconciles(tmp_path):
    require_image(OPERATOR_IMAGE)
    from harness import OPERATOR_TOKEN, ClusterThread, create_tgs, is_operator, wait_for
    from http_server import free_port

    with ClusterThread() as cluster:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}],
            "users": [{"name": "operator", "user": {"token": OPERATOR_TOKEN}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "operator"}}],
        }))
        kubeconfig.chmod(0o644)  # the image's user (uid 10001) reads it
        port = free_port()
        # the image's entrypoint and CMD, with the liveness port moved off 8080 (the host's network)
        command = ["kopf", "run", "-m", "genserve.operator.main", "--all-namespaces", "--standalone",
                   f"--liveness=http://0.0.0.0:{port}/healthz"]
        log = tmp_path / "operator.log"
        phases = Phases()
        with container(OPERATOR_IMAGE) as ctr, running(
                ctr, command, log, volumes={str(kubeconfig): "/etc/genserve/kubeconfig:ro"},
                env={"KUBECONFIG": "/etc/genserve/kubeconfig",
                     "GENSERVE_OPERATOR_DEFAULT_IMAGE": "localhost/genserve-server:dev"}) as proc:
            wait_for(lambda: proc.poll() is not None or any(
                is_operator(r) and "textgenerationservices" in str(r.url) and r.params.get("watch") == "true"
                for r in list(cluster.cluster._requests)), timeout=300, what="the image's operator watching")
            assert proc.poll() is None, log.read_text()[-4000:]
            phases.mark("buildah from and the operator's watch")
            namespace = f"img-{uuid.uuid4().hex[:8]}"
            from kubernetes import client

            api = client.ApiClient(client.Configuration(host=cluster.url))
            create_tgs(api, namespace, "chat", {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}})
            deployment = wait_for(lambda: cluster.get("apps/v1/deployments", namespace, "chat"), timeout=300,
                                  what="the Deployment the image's operator creates")
            containers = deployment["spec"]["template"]["spec"]["containers"]
            server = next(c for c in containers if c["name"] == "server")
            assert server["image"] == "localhost/genserve-server:dev"  # read from the operator's environment
            assert wait_for(lambda: cluster.get("v1/services", namespace, "chat"), what="the Service")
            wait_http(f"http://127.0.0.1:{port}/healthz", proc, log, timeout=120)
            phases.mark("reconcile and liveness")
            client.CustomObjectsApi(api).delete_namespaced_custom_object(
                "genserve.dev", "v1alpha1", namespace, "textgenerationservices", "chat")
        phases.mark("stop and buildah rm")
        print(phases)
