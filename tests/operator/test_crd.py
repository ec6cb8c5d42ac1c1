"""The CRD is the API contract: names, subresources, columns, schema, defaults and CEL rules."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_schema import CelRuleError, apply_defaults, load_crd, openapi_schema, validate

from genserve.operator.spec import AutoscalingSpec, CacheSpec, ServerSpec, SpecError, parse_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))

FULL = {
    "apiVersion": "genserve.dev/v1alpha1", "kind": "TextGenerationService", "metadata": {"name": "full"},
    "spec": {
        "model": {"id": "meta-llama/Llama-3.1-8B-Instruct", "revision": "v1", "tokenSecretRef": {"name": "hf"}},
        "image": "registry.example.com/genserve:1", "imagePullPolicy": "Always",
        "imagePullSecrets": [{"name": "regcred"}], "shards": 2, "replicas": 2,
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 8, "targetQueueDepth": 4,
                        "targetKvCacheUsage": 0.8, "tolerance": 0.1, "intervalSeconds": 10,
                        "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 300,
                        "maxScaleUpStep": 4, "maxScaleDownStep": 1, "metricsSource": "pods"},
        "server": {"maxConcurrentRequests": 256, "maxInputTokens": 4096, "maxTotalTokens": 8192,
                   "quantize": "fp8", "dtype": "bfloat16", "gracefulTerminationSeconds": 60,
                   "startupTimeoutSeconds": 3600, "extraArgs": ["--trust-remote-code"],
                   "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]},
        "resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"memory": "80Gi"}},
        "nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}},
        "cache": {"mode": "shared", "size": "200Gi", "storageClassName": "fast", "accessMode": "ReadWriteMany"},
        "routing": {"inferencePool": {"enabled": True, "gatewayRef": {"name": "inference-gateway", "namespace": "gw"},
                                      "endpointPicker": {"name": "llama-epp", "port": 9002,
                                                         "failureMode": "FailOpen"}}},
        "ingress": {"enabled": True, "host": "llm.example.com", "className": "nginx",
                    "tls": {"secretName": "llm-tls"}, "annotations": {"a": "b"}},
        "apiKeySecretRef": {"name": "api-key"}, "serviceAccountName": "sa",
        "podAnnotations": {"x": "y"}, "podLabels": {"team": "ml"}, "monitoring": {"enabled": True},
    },
}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def test_names_scope_and_subresources():
    crd = load_crd()
    assert crd["metadata"]["name"] == "textgenerationservices.genserve.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("TextGenerationService",
                                                                     "textgenerationservices", ["tgs"])
    assert crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                 "statusReplicasPath": ".status.replicas",
                                                 "labelSelectorPath": ".status.selector"}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Model"] == ".spec.model.id" and columns["Shards"] == ".spec.shards"
    assert columns["Replicas"] == ".status.replicas" and columns["Ready"] == ".status.readyReplicas"
    assert columns["Queue"] == ".status.queueDepth" and columns["Age"] == ".metadata.creationTimestamp"


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_crd_is_a_valid_apiextensions_v1_object(version):
    kubernetes_validate.validate(load_crd(), version, strict=True)


def test_status_fields_and_condition_types_match_the_contract():
    status = openapi_schema(load_crd())["properties"]["status"]["properties"]
    for field in ("replicas", "readyReplicas", "desiredReplicas", "queueDepth", "endpoint", "observedGeneration",
                  "lastScaleTime", "conditions", "selector"):
        assert field in status
    condition = status["conditions"]["items"]["properties"]
    assert condition["type"]["enum"] == ["Ready", "Progressing", "Degraded", "ScalingActive", "CacheReady"]
    assert {"status", "reason", "message", "lastTransitionTime"} <= set(condition)


@pytest.mark.parametrize(("path", "cls"), [("autoscaling", AutoscalingSpec), ("server", ServerSpec),
                                           ("cache", CacheSpec)])
def test_crd_defaults_equal_the_operator_defaults(path, cls):
    props = openapi_schema(load_crd())["properties"]["spec"]["properties"][path]["properties"]
    checked = 0
    for field in dataclasses.fields(cls):
        if field.default is dataclasses.MISSING or field.default is None or field.name == "is_legacy":
            continue
        schema = props[camel(field.name)]
        assert schema.get("default") == field.default, field.name
        checked += 1
    assert checked >= 3


def test_top_level_defaults_equal_the_operator_defaults():
    spec = openapi_schema(load_crd())["properties"]["spec"]
    defaulted = apply_defaults(spec, {"model": {"id": "m"}, "autoscaling": {}, "server": {}, "cache": {}})
    parsed = parse_spec({"model": {"id": "m"}}, "img")
    assert defaulted["shards"] == parsed.shards and defaulted["replicas"] == parsed.replicas
    assert defaulted["model"]["revision"] == parsed.model.revision
    assert parse_spec(defaulted, "img") == parsed


def test_full_object_validates_and_parses():
    defaulted = validate(FULL)
    spec = parse_spec(defaulted["spec"], "img")
    assert spec.shards == 2 and spec.autoscaling.max_replicas == 8 and spec.ingress.tls_secret_name == "llm-tls"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "TextGenerationService":
            defaulted = validate(doc)
            parse_spec(defaulted["spec"], "img")


@pytest.mark.parametrize(("patch", "pattern"), [
    ({"shards": 9}, "9 is greater than the maximum of 8"),
    ({"server": {"quantize": "int3"}}, "'int3' is not one of"),
    ({"model": {"id": "m", "sauce": "hf://x/y"}}, "Additional properties are not allowed"),
    ({"cache": {"mode": "everywhere"}}, "'everywhere' is not one of"),
    ({"cache": {"mode": "shared", "accessMode": "ReadWriteSometimes"}}, "'ReadWriteSometimes' is not one of"),
    ({"modle": {"id": "typo"}}, "Additional properties are not allowed"),
    ({"autoscaling": {"minReplicas": -1}}, "-1 is less than the minimum of 0"),
    ({"autoscaling": {"minReplicas": 0, "scaleToZeroAfterSeconds": 5}}, "5 is less than the minimum of 10"),
    ({"cache": {"size": "lots"}}, "does not match"),
])
def test_schema_rejects_invalid_specs(patch, pattern):
    obj = {**FULL, "spec": {**FULL["spec"], **patch}}
    with pytest.raises(jsonschema.ValidationError, match=re.escape(pattern) if "'" in pattern else pattern):
        validate(obj)


@pytest.mark.parametrize(("patch", "message", "reason"), [
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas must be <= maxReplicas",
     "InvalidReplicaBounds"),
    ({"ingress": {"enabled": True}}, "host is required", "InvalidIngress"),
    ({"server": {"maxInputTokens": 4096, "maxTotalTokens": 4096}}, "maxInputTokens must be < maxTotalTokens",
     "InvalidTokenLimits"),
    ({"autoscaling": {"metricsSource": "prometheus"}}, "prometheusUrl is required", "InvalidField"),
    ({"autoscaling": {"enabled": True, "minReplicas": 0, "metricsSource": "prometheus",
                      "prometheusUrl": "http://prom:9090"}}, "needs metricsSource pods", "InvalidField"),
    ({"cache": {"mode": "shared", "accessMode": "ReadWriteOnce"}}, "allows one node", "CacheNotShareable"),
    ({"cache": {"mode": "shared", "accessMode": "ReadWriteOncePod"}, "autoscaling": {"enabled": False},
      "replicas": 2}, "allows one node", "CacheNotShareable"),
    ({"cache": {"existingClaim": "weights"}}, "existingClaim needs mode shared", "InvalidField"),
    ({"model": {}}, "set exactly one of spec.model.id and spec.model.source", "MissingModel"),
    ({"model": {"id": "m", "source": "hf://org/m"}}, "set exactly one", "InvalidModelSource"),
    ({"model": {"source": "ftp://mirror/models/m"}}, "source must be", "UnsupportedModelSource"),
    ({"model": {"source": "hf://org/m", "s3": {"region": "eu"}}}, "only for s3:// sources", "InvalidModelSource"),
    ({"routing": {"inferencePool": {"enabled": True}}}, "gatewayRef is required", "InvalidInferencePool"),
])
def test_cel_rules_and_the_operator_reject_the_same_specs(patch, message, reason):
    pytest.importorskip("celpy", reason="cel-python evaluates the CRD's x-kubernetes-validations")
    obj = {**FULL, "spec": {**{k: v for k, v in FULL["spec"].items() if k not in ("server", "ingress")}, **patch}}
    with pytest.raises(CelRuleError, match=message):
        validate(obj)
    with pytest.raises(SpecError) as err:
        parse_spec(obj["spec"], "img")
    assert err.value.reason == reason


def test_quantize_enum_is_the_servers_one_list():
    """The CRD (and the chart's copy) offer exactly the methods the server serves, in its order; quantized
    weights run on CPU too, so a CPU service (shards 0) may ask for them."""
    from genserve.server.quant_methods import METHODS

    version = load_crd()["spec"]["versions"][0]  # the chart's copy is kept equal by scripts/sync_crds.py
    server = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["server"]
    assert server["properties"]["quantize"]["enum"] == list(METHODS)
    validate({**FULL, "spec": {**FULL["spec"], "shards": 0, "server": {"quantize": "int4"}}})
