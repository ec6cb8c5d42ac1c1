"""Runs the emulated API server on its own thread and event loop, so sync callers (the official client,
the operator's executor threads) and kopf's own loop never share a loop with it."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import kmock
from emulator import Cluster, str_resource
from kmock import ResourceInfo
from kubernetes import client

TGS = "genserve.dev/v1alpha1/textgenerationservices"
GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
VERBS = {"list", "watch", "get", "patch", "create", "delete", "update"}


def register_resources(cluster: Cluster) -> None:
    cluster.resources.load_bundled()
    cluster.resources[TGS] = ResourceInfo(kind="TextGenerationService", singular="textgenerationservice",
                                          namespaced=True, shortnames={"tgs"}, verbs=VERBS,
                                          subresources={"status", "scale"})


class ClusterThread:
    def __init__(self, setup: Callable[[Cluster], None] = register_resources):
        self._setup = setup
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cluster: Cluster | None = None
        self.url = ""

    def __enter__(self) -> ClusterThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with Cluster() as cluster, kmock.Server(cluster) as server:
            self._setup(cluster)
            self.cluster = cluster
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[[Cluster], Any]) -> Any:
        """Run fn(cluster) on the emulator's loop (its store is not thread-safe)."""
        async def run() -> Any:
            async with self.cluster._lock:
                return fn(self.cluster)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        def find(cluster: Cluster) -> dict[str, Any] | None:
            for (res, ns, n), obj in cluster.store.items():
                if str_resource(res) == resource and ns == namespace and n == name:
                    return copy.deepcopy(obj)
            return None
        return self.call(find)

    def list(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.call(lambda c: [copy.deepcopy(o) for (r, ns, _), o in c.store.items()
                                    if str_resource(r) == resource and (namespace is None or ns == namespace)])


def wait_for(predicate: Callable[[], Any], timeout: float = 120.0, interval: float = 0.05, what: str = "") -> Any:
    """Polls until the predicate holds. The cap is generous on purpose: the emulator, the operator and the
    test share two busy cores in CI, so a cap is there only to end a test that is really stuck."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def tgs_body(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "genserve.dev/v1alpha1", "kind": "TextGenerationService",
            "metadata": {"name": name}, "spec": spec}


class MetricsEndpoint:
    """A real local HTTP server whose /metrics text the test controls; `stop()` makes it unreachable."""

    def __init__(self, text: str = ""):
        import http.server

        endpoint = self
        self.text = text
        self.scrapes = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                endpoint.scrapes += 1
                body = endpoint.text.encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def set(self, waiting: float, running: float, kv: float | None = None, tgi_names: bool = False) -> None:
        names = (("tgi_queue_size", "tgi_batch_current_size") if tgi_names
                 else ("genserve_num_requests_waiting", "genserve_num_requests_running"))
        lines = [f"# TYPE {names[0]} gauge", f"{names[0]} {waiting}", f"# TYPE {names[1]} gauge",
                 f"{names[1]} {running}"]
        if kv is not None:
            lines += ["# TYPE genserve_kv_cache_usage_ratio gauge", f"genserve_kv_cache_usage_ratio {kv}"]
        self.text = "\n".join(lines) + "\n"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def add_ready_pod(api, namespace: str, service: str, name: str, port: int) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": name, "labels": {"genserve.dev/service": service}},
        "spec": {"containers": [{"name": "server", "image": "x", "ports": [{"name": "http", "containerPort": port}]}]},
    })
    core.patch_namespaced_pod_status(name, namespace, {"status": {
        "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}})


def replicas(cluster, namespace: str, name: str = "chat") -> int:
    return cluster.get("apps/v1/deployments", namespace, name)["spec"]["replicas"]


def tgs_status(api, namespace: str, name: str = "chat") -> dict:
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return obj.get("status") or {}
