"""Gateway API Inference Extension, pure builders: an InferencePool over the server pods, whose endpoint
picker routes each request by queue and KV cache, and the HTTPRoute from a Gateway to it."""

from __future__ import annotations

from typing import Any

from genserve.operator.settings import SERVICE_LABEL
from genserve.operator.spec import ServiceSpec

POOL_API = ("inference.networking.k8s.io/v1", "inferencepools")
ROUTE_API = ("gateway.networking.k8s.io/v1", "httproutes")


def picker_name(name: str, spec: ServiceSpec) -> str:
    return spec.inference_pool.picker_name or f"{name}-epp"


def build_inference_pool(name: str, namespace: str, spec: ServiceSpec, labels: dict[str, str],
                         port: int) -> dict[str, Any]:
    pool = spec.inference_pool
    return {
        "apiVersion": POOL_API[0],
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            # the server pods only (not the activator, nor the fill Job's pod)
            "selector": {"matchLabels": {SERVICE_LABEL: name}},
            "targetPorts": [{"number": port}],
            "endpointPickerRef": {"kind": "Service", "name": picker_name(name, spec),
                                  "port": {"number": pool.picker_port}, "failureMode": pool.failure_mode},
        },
    }


def build_http_route(name: str, namespace: str, spec: ServiceSpec, labels: dict[str, str]) -> dict[str, Any]:
    gateway = spec.inference_pool.gateway
    parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway.name}
    if gateway.namespace:
        parent["namespace"] = gateway.namespace
    if gateway.section_name:
        parent["sectionName"] = gateway.section_name
    route: dict[str, Any] = {
        "parentRefs": [parent],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                   "backendRefs": [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": name}]}],
    }
    if spec.ingress.host:
        route["hostnames"] = [spec.ingress.host]
    return {"apiVersion": ROUTE_API[0], "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": route}
