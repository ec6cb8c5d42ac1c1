"""status.adapters: which adapters a server pod has loaded, read from its /v1/models (vLLM's format:
each adapter is an entry whose `parent` is the base model). One ready pod answers; when none does, the
spec's list is reported with loaded Unknown, and status says so."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from genserve.operator import metrics_scrape
from genserve.operator.kube import Kube
from genserve.operator.spec import ServiceSpec

PODS_TRIED = 2
NO_POD = "spec: no ready pod answered"


def loaded_adapters(pod: dict[str, Any], timeout: float) -> set[str]:
    url = metrics_scrape.metrics_url(pod).removesuffix("/metrics") + "/v1/models"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = json.loads(response.read())
    return {str(m["id"]) for m in body.get("data") or [] if isinstance(m, dict) and m.get("parent") and "id" in m}


def adapters_status(kube: Kube, namespace: str, selector: dict[str, str], spec: ServiceSpec,
                    timeout: float) -> dict[str, Any]:
    """`adapters` and `adaptersReadFrom` for the status; both None (cleared) without adapters."""
    if not spec.adapters:
        return {"adapters": None, "adaptersReadFrom": None}
    pods = sorted((p for p in kube.list("Pod", namespace, selector) if metrics_scrape.is_pod_ready(p)),
                  key=lambda p: p["metadata"]["name"])
    wanted = [a.name for a in spec.adapters]
    for pod in pods[:PODS_TRIED]:
        try:
            loaded = loaded_adapters(pod, timeout)
        except Exception:  # unreachable or not answering as expected: try the next pod
            continue
        items = [{"name": n, "loaded": "True" if n in loaded else "False"} for n in wanted]
        # loaded at runtime (the server's load endpoint), not in the spec
        items += [{"name": n, "loaded": "True"} for n in sorted(loaded - set(wanted))]
        return {"adapters": items, "adaptersReadFrom": f"pod {pod['metadata']['name']}"}
    return {"adapters": [{"name": n, "loaded": "Unknown"} for n in wanted], "adaptersReadFrom": NO_POD}
