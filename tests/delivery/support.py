"""Shared helpers for the delivery tests: chart rendering, Kubernetes validation, the CRD."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "genserve"
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"


# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
RELEASE, NAMESPACE = "genserve", "genserve-system"


@functools.cache
def _chart():
    return helm.Chart.load(CHART)


def render(values: dict | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template genserve charts/genserve -n genserve-system`."""
    return _chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render_objects(values: dict | None = None) -> list[dict]:
    objects = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def validate_builtin(obj: dict, version: str) -> None:
    """Strict kubernetes-validate of a built-in kind (unknown fields fail)."""
    kubernetes_validate.validate(obj, version, strict=True)


def object_meta_schema(version: str) -> dict:
    """The strict ObjectMeta JSON schema (draft 2020-12) kubernetes-validate ships for `version`."""
    major_minor = ".".join(version.split(".")[:2])
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{major_minor}.0-local-strict"
    definitions = json.loads((base / "_definitions.json").read_text())
    definitions.pop("$id", None)
    return {**definitions, "$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


def crd_files() -> list[Path]:
    return sorted(CRDS.glob("*.yaml"))


def load_crd(kind: str = "TextGenerationService") -> dict:
    for path in crd_files():
        crd = yaml.safe_load(path.read_text())
        if crd.get("spec", {}).get("names", {}).get("kind") == kind:
            return crd
    pytest.skip(f"crds/ holds no CRD for {kind} yet (owned by the operator work)")


def strict_openapi(schema: dict) -> dict:
    """A CRD openAPIV3Schema as JSON Schema that also rejects unknown fields.

    The API server prunes unknown fields silently; for our own examples a typo should fail instead.
    """
    schema = dict(schema)
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key in ("properties",):
        if key in schema:
            schema[key] = {k: strict_openapi(v) for k, v in schema[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict_openapi(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict_openapi(s) for s in schema[key]]
    return schema


def version_schema(crd: dict, version: str = "v1alpha1") -> dict:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"CRD {crd['metadata']['name']} has no version {version}")
