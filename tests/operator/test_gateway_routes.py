"""Gateway API Inference Extension: the InferencePool and HTTPRoute builders, validated against the
published CRD schemas vendored in data/ (strict: unknown fields fail; defaults applied, then CEL rules),
and the real operator creating them only where discovery shows those APIs."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_schema import CelRuleError, validate
from harness import condition, get_tgs, wait_for
from harness import create_tgs as create
from kmock import ResourceInfo
from kubernetes import client

from genserve.operator.reconcile import build_children
from genserve.operator.settings import OperatorSettings
from genserve.operator.spec import parse_spec

DATA = Path(__file__).resolve().parent / "data"
POOL_CRD = yaml.safe_load((DATA / "inferencepools.inference.networking.k8s.io.yaml").read_text())
ROUTE_CRD = yaml.safe_load((DATA / "httproutes.gateway.networking.k8s.io.yaml").read_text())
POOL, ROUTE = "inference.networking.k8s.io/v1/inferencepools", "gateway.networking.k8s.io/v1/httproutes"
GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
WAIT = 120  # generous: the emulator and the operator share two busy cores
SPEC = {"model": {"id": "Qwen/Qwen2.5-7B-Instruct"}, "autoscaling": {"enabled": True, "maxReplicas": 6},
        "routing": {"inferencePool": {"enabled": True, "gatewayRef": {"name": "inference-gateway",
                                                                      "namespace": "gateway",
                                                                      "sectionName": "http"}}}}


def build(raw: dict):
    spec = parse_spec(raw, "img")
    wanted, absent = build_children("chat", "ns", spec, OperatorSettings(), 1, has_inference_pool=True)
    return {o["kind"]: o for o in wanted}, absent


def test_pool_selects_the_server_pods_on_their_port_with_an_endpoint_picker():
    objs, _ = build(SPEC)
    pool = validate(objs["InferencePool"], POOL_CRD)
    deployment = objs["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    assert pool["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "chat-epp", "port": {"number": 9002},
                                                 "failureMode": "FailClose", "group": ""}
    assert pool["spec"]["appProtocol"] == "http"  # the schema's default


def test_route_sends_the_named_gateway_to_the_pool():
    objs, _ = build({**SPEC, "ingress": {"host": "chat.example.com"}})
    route = validate(objs["HTTPRoute"], ROUTE_CRD)
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "inference-gateway", "namespace": "gateway",
                                            "sectionName": "http"}]
    assert route["spec"]["hostnames"] == ["chat.example.com"]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "chat", "weight": 1}


def test_picker_name_port_and_failure_mode_are_configurable():
    raw = copy.deepcopy(SPEC)
    raw["routing"]["inferencePool"]["endpointPicker"] = {"name": "shared-epp", "port": 9010, "failureMode": "FailOpen"}
    objs, _ = build(raw)
    ref = validate(objs["InferencePool"], POOL_CRD)["spec"]["endpointPickerRef"]
    assert (ref["name"], ref["port"], ref["failureMode"]) == ("shared-epp", {"number": 9010}, "FailOpen")


def test_core_objects_stay_valid_kubernetes():
    objs, _ = build(SPEC)
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        kubernetes_validate.validate(objs[kind], kubernetes_validate.latest_version(), strict=True)


def test_the_vendored_schemas_catch_mistakes():
    objs, _ = build(SPEC)
    no_port = copy.deepcopy(objs["InferencePool"])
    del no_port["spec"]["endpointPickerRef"]["port"]
    with pytest.raises(CelRuleError, match="port is required"):
        validate(no_port, POOL_CRD)
    typo = copy.deepcopy(objs["InferencePool"])
    typo["spec"]["targetPortNumber"] = 8080  # the v1alpha2 field name
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        validate(typo, POOL_CRD)
    service_backend = copy.deepcopy(objs["HTTPRoute"])
    service_backend["spec"]["rules"][0]["backendRefs"] = [{"name": "chat"}]
    with pytest.raises(CelRuleError, match="Must have port for Service reference"):
        validate(service_backend, ROUTE_CRD)


def test_disabled_pool_is_absent():
    _, absent = build({"model": {"id": "m"}})
    assert ("InferencePool", "chat") in absent and ("HTTPRoute", "chat") in absent


# ---- the real operator ----------------------------------------------------------------------------------

def degraded(api, namespace, name):
    return condition(get_tgs(api, namespace, name), "Degraded")


def test_pool_without_its_crds_is_degraded_and_the_service_still_runs(operator, api, cluster, namespace):
    create(api, namespace, "nopool", {**SPEC, "shards": 0})
    condition = wait_for(lambda: (c := degraded(api, namespace, "nopool")) and c["status"] == "True" and c,
                         timeout=WAIT, what="Degraded")
    assert condition["reason"] == "InferencePoolUnavailable" and "inference.networking.k8s.io/v1" in condition["message"]
    assert cluster.get("apps/v1/deployments", namespace, "nopool") is not None
    assert cluster.get("v1/services", namespace, "nopool") is not None


@pytest.fixture()
def inference_extension(cluster):
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    infos = {POOL: ResourceInfo(kind="InferencePool", namespaced=True, verbs=verbs),
             ROUTE: ResourceInfo(kind="HTTPRoute", namespaced=True, verbs=verbs)}
    for key, info in infos.items():
        cluster.call(lambda c, k=key, i=info: c.resources.__setitem__(k, i))
    yield
    for key in infos:
        cluster.call(lambda c, k=key: c.resources.__delitem__(k))


def test_pool_and_route_are_created_when_the_crds_exist(inference_extension, operator, api, cluster, namespace):
    create(api, namespace, "pooled", {**SPEC, "shards": 0})
    pool = wait_for(lambda: cluster.get(POOL, namespace, "pooled"), timeout=WAIT, what="the InferencePool")
    route = wait_for(lambda: cluster.get(ROUTE, namespace, "pooled"), timeout=WAIT, what="the HTTPRoute")
    for obj, crd in ((pool, POOL_CRD), (route, ROUTE_CRD)):
        stored = {k: v for k, v in obj.items() if k != "status"}
        stored["metadata"] = {}
        validate(stored, crd)
    assert pool["metadata"]["ownerReferences"][0]["kind"] == "TextGenerationService"
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == "pooled"
    wait_for(lambda: (c := degraded(api, namespace, "pooled")) and c["status"] == "False", timeout=WAIT,
             what="Degraded=False")
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "pooled", {"spec": {"routing": {"inferencePool": {"enabled": False}}}})
    wait_for(lambda: cluster.get(POOL, namespace, "pooled") is None and cluster.get(ROUTE, namespace, "pooled")
             is None, timeout=WAIT, what="the pool and route removed")
