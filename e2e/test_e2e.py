"""genserve on a real cluster: chart -> operator -> TextGenerationService -> streamed completion -> autoscale -> cleanup.

Run `pytest e2e -v` after the setup in e2e/README.md; without a reachable cluster every test skips.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path

import pytest
import urllib3
import yaml

from .support import GROUP, PLURAL, ROOT, VERSION, wait_for

pytestmark = pytest.mark.e2e
READY_TIMEOUT = float(os.environ.get("E2E_READY_TIMEOUT", "1200"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def _get(kube, namespace: str, name: str) -> dict:
    return kube.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def _is_ready(kube, namespace: str, name: str) -> dict | None:
    obj = _get(kube, namespace, name)
    ready = _condition(obj, "Ready")
    return obj if ready and ready["status"] == "True" else None


class ServiceProxy:
    """HTTP to a Service through the API server's proxy: no port-forward, no kubectl, no extra images."""

    def __init__(self, kube, namespace: str, service: str, port: str = "http"):
        cfg = kube.Configuration.get_default_copy()
        self.base = f"{cfg.host}/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy"
        self.headers = {"Content-Type": "application/json"}
        for auth in cfg.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                self.headers[auth["key"]] = auth["value"]
        self.pool = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE",
            ca_certs=cfg.ssl_ca_cert, cert_file=cfg.cert_file, key_file=cfg.key_file, maxsize=64,
        )

    def post(self, path: str, body: dict, timeout: float = 300) -> urllib3.BaseHTTPResponse:
        return self.pool.request("POST", self.base + path, body=json.dumps(body).encode(), headers=self.headers,
                                 preload_content=False, timeout=timeout)

    def get(self, path: str, timeout: float = 30) -> urllib3.BaseHTTPResponse:
        return self.pool.request("GET", self.base + path, headers=self.headers, timeout=timeout)


def _sse_events(response) -> list[str]:
    events = []
    for raw in response.read().decode().splitlines():
        if raw.startswith("data:"):
            events.append(raw[5:].strip())
    return events


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_accepted_by_the_api_server(kube, operator_release, namespace, path):
    """Server-side dry run: the real CRD schema, defaults and CEL rules accept every example."""
    obj = yaml.safe_load(path.read_text())
    created = kube.CustomObjectsApi().create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, obj, dry_run="All")
    assert created["spec"]["model"]["id"] == obj["spec"]["model"]["id"]


def test_invalid_spec_is_rejected(kube, operator_release, namespace):
    obj = _example("smollm2-cpu.yaml")
    obj["spec"]["autoscaling"] = {"enabled": True, "minReplicas": 3, "maxReplicas": 2}
    with pytest.raises(kube.ApiException) as raised:
        kube.CustomObjectsApi().create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj, dry_run="All")
    assert raised.value.status == 422 and "minReplicas" in raised.value.body


def test_serve_stream_autoscale_and_cleanup(kube, operator_release, namespace):
    custom, apps, core = kube.CustomObjectsApi(), kube.AppsV1Api(), kube.CoreV1Api()
    obj = copy.deepcopy(_example("smollm2-cpu.yaml"))
    name = obj["metadata"]["name"]
    # Small batches make requests wait, which is what the autoscaler scales on.
    obj["spec"]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 2, "targetQueueDepth": 1,
                                  "intervalSeconds": 5, "scaleUpStabilizationSeconds": 0,
                                  "scaleDownStabilizationSeconds": 600}
    obj["spec"]["server"] = {"extraArgs": os.environ.get("E2E_LOAD_SERVER_ARGS", "--max-batch-size 2").split()}
    obj["spec"]["resources"] = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)

    # 1. Ready: the operator created the children and the pod loaded the model.
    ready = wait_for(lambda: _is_ready(kube, namespace, name), READY_TIMEOUT, 5, f"{name} Ready")
    assert ready["status"]["endpoint"].endswith("/v1")
    deployment = apps.read_namespaced_deployment(name, namespace)
    assert deployment.metadata.owner_references[0].kind == "TextGenerationService"
    assert core.read_namespaced_service(name, namespace).spec.ports

    # 2. An OpenAI streaming chat completion through the Service.
    proxy = ServiceProxy(kube, namespace, name)
    response = proxy.post("/v1/chat/completions", {
        "model": name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "stream": True})
    assert response.status == 200
    events = _sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 1 and chunks[0]["object"] == "chat.completion.chunk"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]).strip()

    # 3. Load until the autoscaler adds a replica.
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                proxy.post("/generate", {"inputs": "Write a long story about a lighthouse.",
                                         "parameters": {"max_new_tokens": 200}}).read()
            except Exception:  # errors under load are fine for a load generator
                pass

    workers = [threading.Thread(target=client, daemon=True) for _ in range(int(os.environ.get("E2E_CLIENTS", "12")))]
    for worker in workers:
        worker.start()
    try:
        scaled = wait_for(lambda: (s := _get(kube, namespace, name)["status"]).get("desiredReplicas", 0) >= 2 and s,
                          300, 5, "the autoscaler to ask for a second replica")
        assert scaled.get("lastScaleTime")
        wait_for(lambda: (apps.read_namespaced_deployment(name, namespace).spec.replicas or 0) >= 2, 60, 2,
                 "the Deployment to be scaled")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=330)

    # 4. Delete: owner references take the children with it.
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: not apps.list_namespaced_deployment(namespace, label_selector=f"genserve.dev/service={name}").items
             and not core.list_namespaced_service(namespace, label_selector=f"genserve.dev/service={name}").items,
             180, 3, "children to be garbage-collected")


def test_scale_to_zero_and_wake_on_a_request(kube, operator_release, namespace):
    """minReplicas 0: idle -> 0 replicas with the Service on the activator; a request is held, wakes a
    replica and is answered through the activator."""
    custom, apps = kube.CustomObjectsApi(), kube.AppsV1Api()
    obj = copy.deepcopy(_example("smollm2-cpu.yaml"))
    name = obj["metadata"]["name"] = "smollm2-zero"
    obj["spec"]["autoscaling"] = {"enabled": True, "minReplicas": 0, "maxReplicas": 1, "intervalSeconds": 2,
                                  "scaleToZeroAfterSeconds": 10}
    obj["spec"]["resources"] = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)
    wait_for(lambda: _is_ready(kube, namespace, name), READY_TIMEOUT, 5, f"{name} Ready")
    wait_for(lambda: apps.read_namespaced_deployment(f"{name}-activator", namespace).status.ready_replicas, 300, 2,
             "the activator to be ready")
    wait_for(lambda: apps.read_namespaced_deployment(name, namespace).spec.replicas == 0, 120, 2, "scale to zero")
    zero = wait_for(lambda: (c := _condition(_get(kube, namespace, name), "Ready")) and c["reason"] == "ScaledToZero"
                    and c, 120, 2, "Ready=ScaledToZero")
    assert zero["status"] == "True"
    # stay up once woken, for the checks below
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                          {"spec": {"autoscaling": {"scaleToZeroAfterSeconds": 600}}})

    proxy = ServiceProxy(kube, namespace, name)
    response = proxy.post("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}, timeout=READY_TIMEOUT)
    assert response.status == 200, response.read()[:500]
    assert json.loads(response.read())["generated_text"]
    assert apps.read_namespaced_deployment(name, namespace).spec.replicas == 1
    assert _get(kube, namespace, name)["status"]["lastScaleDecision"]["reason"] == "WakeUp"
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def test_readme_commands_name_existing_files():
    readme = (Path(__file__).parent / "README.md").read_text()
    for token in ("Dockerfile.server", "Dockerfile.operator", "charts/genserve", "examples/smollm2-cpu.yaml"):
        assert token in readme
        assert (ROOT / token).exists()
