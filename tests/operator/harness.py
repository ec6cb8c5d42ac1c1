"""Runs the emulated API server on its own thread and event loop, so sync callers (the official client,
the operator's executor threads) and kopf's own loop never share a loop with it."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import attrs
import kmock
from emulator import Cluster, str_resource
from kmock import Request, ResourceInfo
from kubernetes import client

# The emulator's access log: one INFO line per API call, emitted from its thread, often after pytest has
# closed the stream a test captured ("--- Logging error --- I/O operation on closed file" in the suite log)
logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

TGS = "genserve.dev/v1alpha1/textgenerationservices"
GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
VERBS = {"list", "watch", "get", "patch", "create", "delete", "update"}


# the token of the operator's kubeconfig: tells the operator's requests from the test's own client (no token)
OPERATOR_TOKEN = "genserve-operator"


@dataclass
class Fault:
    """Answers the next `count` requests that `match` with `status` (after `delay` s), or drops the connection
    without an answer (status 0): what a real API server does under etcd trouble, conflicts or a restart."""
    match: Callable[[Request], bool]
    status: int = 500
    count: int = 1
    delay: float = 0.0
    reason: str = "InternalError"
    hits: list[float] = field(default_factory=list)  # monotonic time of each faulted request
    released: bool = False  # ends a `delay` early (a held request answers at once)

    def release(self) -> None:
        self.released = True

    @property
    def spent(self) -> bool:
        return len(self.hits) >= self.count


def is_operator(request: Request) -> bool:
    return request.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}"


def matches(method: str, plural: str, name: str | None = None, namespace: str | None = None,
            subresource: str | None = None) -> Callable[[Request], bool]:
    """A Fault predicate: the operator's requests of this method on this resource (and object)."""
    def match(r: Request) -> bool:
        return (is_operator(r) and r.method.value == method and r.resource is not None
                and r.resource.plural == plural and r.subresource == subresource
                and (name is None or r.name == name) and (namespace is None or r.namespace == namespace))
    return match


@attrs.define(kw_only=True)
class FaultyCluster(Cluster):
    """The emulator with fault injection in front of every served request."""
    faults: list[Fault] = attrs.field(factory=list, init=False)

    async def _handle(self, request: Request):
        fault = next((f for f in self.faults if not f.spent and f.match(request)), None)
        if fault is None:
            return await super()._handle(request)
        fault.hits.append(time.monotonic())
        deadline = time.monotonic() + fault.delay
        while time.monotonic() < deadline and not fault.released:
            await asyncio.sleep(0.05)
        if fault.status == 0:
            request._raw_request.transport.close()  # the connection drops mid-request
            raise ConnectionResetError("fault: connection dropped")
        return aiohttp.web.json_response({
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": fault.status,
            "reason": fault.reason, "message": f"injected fault: {fault.reason}"}, status=fault.status)


def register_resources(cluster: Cluster) -> None:
    cluster.resources.load_bundled()
    cluster.resources[TGS] = ResourceInfo(kind="TextGenerationService", singular="textgenerationservice",
                                          namespaced=True, shortnames={"tgs"}, verbs=VERBS,
                                          subresources={"status", "scale"})


class ClusterThread:
    started: list[ClusterThread] = []  # every emulator of the session: the API-call recorder reads them all

    def __init__(self, setup: Callable[[Cluster], None] = register_resources):
        self._setup = setup
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cluster: Cluster | None = None
        self.url = ""

    def __enter__(self) -> ClusterThread:
        ClusterThread.started.append(self)
        self._thread.start()
        if not self._ready.wait(120):  # generous: a loaded machine can take a while to start a thread's loop
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
        async with FaultyCluster() as cluster, kmock.Server(cluster) as server:
            self._setup(cluster)
            self.cluster = cluster
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def inject(self, *faults: Fault) -> tuple[Fault, ...]:
        self.call(lambda c: c.faults.extend(faults))
        return faults

    def clear_faults(self) -> None:
        def clear(cluster: FaultyCluster) -> None:
            for fault in cluster.faults:
                fault.release()
            cluster.faults.clear()
        self.call(clear)

    def operator_requests(self) -> list[Request]:
        return [r for r in list(self.cluster._requests) if is_operator(r)]

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
        self.sequence: list[str] = []  # when set, scrape i answers sequence[i % len] (a noisy signal)
        self.hang = threading.Event()  # while set, a scrape is accepted and never answered
        self.served: list[tuple[float, str]] = []  # (monotonic time, text) of each answered scrape

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                while endpoint.hang.is_set():
                    time.sleep(0.05)
                endpoint.scrapes += 1
                text = endpoint.sequence[endpoint.scrapes % len(endpoint.sequence)] if endpoint.sequence \
                    else endpoint.text
                endpoint.served.append((time.monotonic(), text))
                body = text.encode()
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

    @staticmethod
    def render(waiting: float, running: float, kv: float | None = None, tgi_names: bool = False) -> str:
        names = (("tgi_queue_size", "tgi_batch_current_size") if tgi_names
                 else ("genserve_num_requests_waiting", "genserve_num_requests_running"))
        lines = [f"# TYPE {names[0]} gauge", f"{names[0]} {waiting}", f"# TYPE {names[1]} gauge",
                 f"{names[1]} {running}"]
        if kv is not None:
            lines += ["# TYPE genserve_kv_cache_usage_ratio gauge", f"genserve_kv_cache_usage_ratio {kv}"]
        return "\n".join(lines) + "\n"

    def set(self, waiting: float, running: float, kv: float | None = None, tgi_names: bool = False) -> None:
        self.text = self.render(waiting, running, kv, tgi_names)

    def stop(self) -> None:
        self.hang.clear()
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


def create_tgs(api, namespace: str, name: str, spec: dict[str, Any]) -> dict:
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, tgs_body(name, spec))


def get_tgs(api, namespace: str, name: str) -> dict:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def tgs_status(api, namespace: str, name: str = "chat") -> dict:
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return obj.get("status") or {}


def api_calls(request: Request) -> list[tuple[str, str, str, str]]:
    """(verb, API group, resource[/subresource], namespace or "" when cluster-wide) of a request, as RBAC
    authorizes it. Discovery (/api, /apis/<group>/<version>, /version) gives none: RBAC does not gate it here
    (every authenticated user reads it through the system:discovery role). A server-side apply is a patch
    and, as the API server authorizes an apply that creates the object, also a create."""
    if request.resource is None or not request.resource.plural:
        return []
    method = request.method.value
    if method == "GET":
        verbs = ["get" if request.name else ("watch" if request.params.get("watch") in ("true", "1") else "list")]
    elif method == "PATCH" and (request.headers.get("Content-Type") or "").startswith("application/apply-patch"):
        verbs = ["patch", "create"]
    else:
        verbs = [{"POST": "create", "PUT": "update", "PATCH": "patch",
                  "DELETE": "delete" if request.name else "deletecollection"}[method]]
    resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
    return [(verb, request.resource.group, resource, request.namespace or "") for verb in verbs]


def recorded_calls(threads: list[ClusterThread] | None = None) -> set[tuple[str, str, str, str]]:
    """Every API call the operator made to these emulators (all of the session's by default)."""
    calls = set()
    for ct in ClusterThread.started if threads is None else threads:
        calls |= {c for r in ct.operator_requests() for c in api_calls(r)}
    return calls


def call_scopes(calls: set[tuple[str, str, str, str]]) -> set[tuple[str, str, str, str]]:
    """The calls with the (random, per-test) namespace reduced to its scope: "namespaced" or "cluster"."""
    return {(v, g, r, "namespaced" if ns else "cluster") for v, g, r, ns in calls}


class OperatorProcess:
    """The operator as its own process (`kopf run`, as the chart runs it), so a test can SIGKILL it
    mid-reconcile and start another one."""

    def __init__(self, kubeconfig: str, args: list[str], log_path: str):
        self.kubeconfig, self.args, self.log_path = kubeconfig, args, log_path
        self.proc = None

    def start(self) -> OperatorProcess:
        import os
        import subprocess
        import sys
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        log = open(self.log_path, "a")  # noqa: SIM115 - the child writes to it for its whole life
        self.proc = subprocess.Popen([sys.executable, "-m", "kopf", "run", "-m", "genserve.operator.main",
                                      *self.args], env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up handler, no finalizer release, whatever it was doing is cut off."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.kill()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()
