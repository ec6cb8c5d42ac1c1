"""A small JSON client over the official `kubernetes` ApiClient: auth and TLS come from it, paths from here."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from genserve.operator.settings import FIELD_MANAGER, GROUP, PLURAL, VERSION

# kinds the operator reads or writes -> (apiVersion, plural)
KINDS = {
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "Ingress": ("networking.k8s.io/v1", "ingresses"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors"),
    "PodMonitor": ("monitoring.coreos.com/v1", "podmonitors"),
    "Pod": ("v1", "pods"),
    "Secret": ("v1", "secrets"),
    "Job": ("batch/v1", "jobs"),
    "InferencePool": ("inference.networking.k8s.io/v1", "inferencepools"),
    "HTTPRoute": ("gateway.networking.k8s.io/v1", "httproutes"),
    "TextGenerationService": (f"{GROUP}/{VERSION}", PLURAL),
}


class NotFound(Exception):
    pass


def load_api_client() -> client.ApiClient:
    """In-cluster service account first, then the local kubeconfig ($KUBECONFIG)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        # the library reads $KUBECONFIG at import time; read it at call time instead
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return client.ApiClient(configuration)


def path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    api_version, plural = KINDS[kind]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    out = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    if name:
        out += f"/{name}"
    return out + (f"/{subresource}" if subresource else "")


class Kube:
    def __init__(self, api_client: client.ApiClient, timeout: float = 10.0):
        self.api = api_client
        self.timeout = timeout

    def request(self, method: str, url_path: str, body: Any = None, query: dict[str, str] | None = None,
                content_type: str = "application/json") -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = list((query or {}).items())
        m, url, headers, body, _ = self.api.param_serialize(method, url_path, query_params=params,
                                                            header_params=headers, body=body,
                                                            auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(m, url, header_params=headers, body=body,
                                         _request_timeout=self.timeout)
            response.read()
        except ApiException as e:
            if e.status == 404:
                raise NotFound(url_path) from e
            raise
        if response.status == 404:
            raise NotFound(url_path)
        if response.status >= 400:
            raise ApiException(status=response.status, reason=response.reason, body=response.data)
        return json.loads(response.data) if response.data else {}

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path(kind, namespace, name))
        except NotFound:
            return None

    def list(self, kind: str, namespace: str | None, label_selector: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
        return self.request("GET", path(kind, namespace), query={"labelSelector": selector}).get("items", [])

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: creates the object or takes back every field we own."""
        meta = obj["metadata"]
        url = path(obj["kind"], meta.get("namespace"), meta["name"])
        return self.request("PATCH", url, body=obj, query={"fieldManager": FIELD_MANAGER, "force": "true"},
                            content_type="application/apply-patch+yaml")

    def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", path(kind, namespace, name, subresource), body=patch,
                            content_type="application/merge-patch+json")

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        # Background: a Job's pods go with it (the API's default for Jobs orphans them)
        try:
            self.request("DELETE", path(kind, namespace, quote(name)), query={"propagationPolicy": "Background"})
            return True
        except NotFound:
            return False

    def has_resource(self, api_version: str, plural: str) -> bool:
        try:
            listing = self.request("GET", f"/apis/{api_version}")
        except (NotFound, ApiException):
            return False
        return any(r.get("name") == plural for r in listing.get("resources", []))
