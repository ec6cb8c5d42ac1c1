"""examples/: one TextGenerationService per file, valid against our CRD's schema and Kubernetes' ObjectMeta."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .support import EXAMPLES, K8S_VERSIONS, load_crd, object_meta_schema, strict_openapi, version_schema

FILES = sorted(EXAMPLES.glob("*.yaml"))


def _load(path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path.name}: one resource per example"
    return docs[0]


def test_the_three_documented_examples_exist():
    specs = {p.name: _load(p)["spec"] for p in FILES}
    smallest = specs["smollm2-cpu.yaml"]
    assert set(smallest) <= {"model", "shards"} and smallest["shards"] == 0
    assert specs["llama-70b-tensor-parallel.yaml"]["shards"] > 1
    autoscaled = specs["mistral-autoscaled-ingress.yaml"]
    assert autoscaled["autoscaling"]["enabled"] and autoscaled["ingress"]["enabled"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_matches_crd_schema(path):
    schema = strict_openapi(version_schema(load_crd()))
    obj = _load(path)
    assert obj["apiVersion"] == "genserve.dev/v1alpha1" and obj["kind"] == "TextGenerationService"
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_metadata_validates(path, version):
    """kubernetes-validate ships no schema for our kind; it says so, and ObjectMeta is checked with its schema."""
    obj = _load(path)
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        kubernetes_validate.validate(obj, version, strict=True)
    jsonschema.Draft202012Validator(object_meta_schema(version)).validate(obj["metadata"])
    assert "namespace" not in obj["metadata"], "examples go into the namespace kubectl is pointed at"


def test_object_meta_schema_is_strict():
    with pytest.raises(jsonschema.ValidationError, match="lables"):
        jsonschema.Draft202012Validator(object_meta_schema(K8S_VERSIONS[0])).validate({"name": "x", "lables": {}})


def test_strict_schema_catches_a_misspelt_field():
    schema = strict_openapi(version_schema(load_crd()))
    bad = {"apiVersion": "genserve.dev/v1alpha1", "kind": "TextGenerationService", "metadata": {"name": "x"},
           "spec": {"model": {"id": "a/b"}, "shard": 2}}
    with pytest.raises(jsonschema.ValidationError, match="shard"):
        jsonschema.validate(bad, schema)


def with_defaults(schema: dict, value):
    """Structural defaulting as the API server does it: fill missing properties that have a default."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for key, child in schema["properties"].items():
            if key not in value and "default" in child:
                value[key] = child["default"]
            if key in value:
                value[key] = with_defaults(child, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [with_defaults(schema["items"], v) for v in value]
    return value


def cel_failures(schema: dict, value, path: str = "") -> list[str]:
    """Messages of the x-kubernetes-validations rules that `value` breaks (evaluated with cel-python)."""
    celpy = pytest.importorskip("celpy", reason="cel-python is not installed: pip install cel-python")
    env = celpy.Environment()
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            failures.append(f"{path or '.'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, child in schema.get("properties", {}).items():
            if key in value:
                failures += cel_failures(child, value[key], f"{path}.{key}")
    return failures


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_passes_cel_rules(path):
    schema = version_schema(load_crd())
    obj = with_defaults(schema, _load(path))
    assert not cel_failures(schema, obj)


def test_cel_rules_reject_min_above_max():
    schema = version_schema(load_crd())
    obj = with_defaults(schema, {"apiVersion": "genserve.dev/v1alpha1", "kind": "TextGenerationService",
                                 "metadata": {"name": "x"},
                                 "spec": {"model": {"id": "a/b"},
                                          "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}}})
    assert any("minReplicas" in f for f in cel_failures(schema, obj))
