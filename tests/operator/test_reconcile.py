"""The pure builders: spec dict in, manifests out, each one valid for Kubernetes 1.29 and the newest schema."""

from __future__ import annotations

import kubernetes_validate
import pytest

from genserve.operator.reconcile import (
    build_children,
    build_deployment,
    desired_replicas,
    routes_to_activator,
    server_args,
)
from genserve.operator.settings import OperatorSettings
from genserve.operator.spec import parse_spec

VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
SETTINGS = OperatorSettings()

SPECS = {
    "cpu": {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "shards": 0},
    "one-gpu-autoscaled": {"model": {"id": "mistralai/Mistral-7B-Instruct-v0.3"}, "autoscaling": {
        "enabled": True, "minReplicas": 1, "maxReplicas": 8}, "ingress": {"enabled": True, "host": "m.example.com",
                                                                             "className": "nginx",
                                                                             "tls": {"secretName": "t"}},
                           "apiKeySecretRef": {"name": "key", "key": "k"}},
    "tensor-parallel": {"model": {"id": "meta-llama/Llama-3.1-70B-Instruct", "tokenSecretRef": {"name": "hf"}},
                        "shards": 4, "replicas": 2, "server": {"maxInputTokens": 8192, "maxTotalTokens": 16384,
                                                               "dtype": "bfloat16", "quantize": "fp8",
                                                               "extraArgs": ["--speculate", "2"]},
                        "resources": {"requests": {"cpu": "16", "memory": "200Gi"}},
                        "nodeSelector": {"gpu": "h100"},
                        "cache": {"mode": "shared", "existingClaim": "weights"},
                        "serviceAccountName": "llm", "imagePullSecrets": [{"name": "reg"}],
                        "podAnnotations": {"a": "b"}},
    "no-cache": {"model": {"id": "m"}, "modelCache": {"enabled": False}, "monitoring": {"enabled": False}},
    "scale-to-zero": {"model": {"id": "m"}, "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 2,
                                                            "scaleToZeroAfterSeconds": 600},
                      "imagePullSecrets": [{"name": "reg"}]},
}


def children(key: str, has_monitor: bool = False):
    spec = parse_spec(SPECS[key], SETTINGS.default_image)
    return spec, *build_children("svc", "ns", spec, SETTINGS, desired_replicas(spec, {}), has_monitor)


def by_kind(objs):
    return {o["kind"]: o for o in objs}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("key", sorted(SPECS))
def test_every_built_manifest_validates_strictly(key, version):
    _, wanted, _ = children(key)
    spec = parse_spec(SPECS[key], SETTINGS.default_image)
    # and the Service as it is while a scale-to-zero service has no ready pod
    wanted += build_children("svc", "ns", spec, SETTINGS, 0, False, True)[0][1:2]
    for obj in wanted:
        kubernetes_validate.validate(obj, version, strict=True)


def test_scale_to_zero_adds_an_activator_and_switches_the_service_while_no_pod_is_ready():
    spec = parse_spec(SPECS["scale-to-zero"], "img")
    assert desired_replicas(spec, {}) == 1  # created warm
    assert desired_replicas(spec, {}, live_replicas=0) == 0  # the autoscaler may take it to zero
    deployment = {"status": {"readyReplicas": 0}}
    assert routes_to_activator(spec, deployment) and routes_to_activator(spec, None)
    assert not routes_to_activator(spec, {"status": {"readyReplicas": 1}})
    # scaled to zero with its last pod still draining: new requests already go to the activator
    assert routes_to_activator(spec, {"spec": {"replicas": 0}, "status": {"readyReplicas": 1}})
    assert not routes_to_activator(parse_spec(SPECS["cpu"], "img"), deployment)
    names = {(o["kind"], o["metadata"]["name"]): o for o in build_children("svc", "ns", spec, SETTINGS, 0,
                                                                           True, True)[0]}
    service, direct = names[("Service", "svc")], names[("Service", "svc-direct")]
    activator = names[("Deployment", "svc-activator")]
    pod_labels = activator["spec"]["template"]["metadata"]["labels"]
    # the Service follows the activator's pods; the direct Service always the server pods
    assert service["spec"]["selector"] == {"genserve.dev/activator": "svc"}
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    assert direct["spec"]["selector"] == {"genserve.dev/service": "svc"}
    assert "genserve.dev/service" not in pod_labels  # never counted as a server pod (autoscaler, PDB)
    container = activator["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == SETTINGS.activator_image
    assert "http://svc-direct.ns.svc.cluster.local:80" in container["command"]
    assert {p["name"] for p in container["ports"]} == {"http", "metrics"}
    assert activator["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "reg"}]
    assert names[("ServiceMonitor", "svc")]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] \
        == "server" and direct["metadata"]["labels"]["app.kubernetes.io/component"] == "server-direct"
    # ready pods: the Service goes back to them; without scale to zero the extras are removed
    ready = build_children("svc", "ns", spec, SETTINGS, 1, False, False)[0]
    assert by_kind(ready)["Service"]["spec"]["selector"] == {"genserve.dev/service": "svc"}
    _, _, absent = children("cpu")
    assert ("Deployment", "svc-activator") in absent and ("Service", "svc-direct") in absent


def test_deployment_for_tensor_parallel():
    spec, wanted, absent = children("tensor-parallel")
    dep = by_kind(wanted)["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert server["resources"]["requests"] == {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "4"}
    args = server["args"]
    assert args[0] == "serve" and args[args.index("--num-shard") + 1] == "4"
    assert args[args.index("--port") + 1] == "8080"
    assert args[args.index("--quantize") + 1] == "fp8" and args[-2:] == ["--speculate", "2"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": SETTINGS.shm_size}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    assert next(v for v in pod["volumes"] if v["name"] == "model-cache")["persistentVolumeClaim"] == {
        "claimName": "weights", "readOnly": True}
    assert "PersistentVolumeClaim" not in by_kind(wanted)  # an existing claim is never created
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in server["env"]
    # the shared claim was filled by the Job: no init step, the server reads it read-only and offline
    assert "initContainers" not in pod
    assert {"name": "model-cache", "mountPath": "/data", "readOnly": True} in server["volumeMounts"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in server["env"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["serviceAccountName"] == "llm"
    assert dep["spec"]["replicas"] == 2 and "PodDisruptionBudget" in by_kind(wanted)
    assert ("Ingress", "svc") in absent


def test_probes_grace_period_and_security():
    spec, wanted, _ = children("tensor-parallel")
    pod = by_kind(wanted)["Deployment"]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    startup = server["startupProbe"]
    # the default 30 minutes for downloading and loading weights
    assert startup["periodSeconds"] * startup["failureThreshold"] >= spec.server.startup_timeout_seconds
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
    # liveness stays 200 through a SIGTERM drain (readiness turns 503): a long drain is not killed
    assert server["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(SETTINGS.prestop_sleep_seconds)]
    assert "--graceful-termination-timeout" in server["args"]
    assert pod["terminationGracePeriodSeconds"] > spec.server.graceful_termination_seconds + \
        SETTINGS.prestop_sleep_seconds
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False


def test_cpu_replica_has_no_gpu_and_no_shm():
    _, wanted, absent = children("cpu")
    dep = by_kind(wanted)["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(pod)
    assert all(v["name"] != "dshm" for v in pod["volumes"])
    assert "--num-shard" not in pod["containers"][0]["args"]
    assert ("PodDisruptionBudget", "svc") in absent  # one replica: a PDB would block node drains


def test_service_ports_and_selector_match_the_pods():
    _, wanted, _ = children("one-gpu-autoscaled")
    objs = by_kind(wanted)
    svc = objs["Service"]
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["http"]["port"] == 80 and ports["http"]["targetPort"] == "http"
    assert ports["metrics"]["targetPort"] == "http"
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert objs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_ingress_and_api_key():
    _, wanted, _ = children("one-gpu-autoscaled")
    objs = by_kind(wanted)
    ingress = objs["Ingress"]["spec"]
    assert ingress["ingressClassName"] == "nginx" and ingress["tls"] == [{"hosts": ["m.example.com"],
                                                                           "secretName": "t"}]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "svc", "port": {"name": "http"}}
    env = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "key", "key": "k"}}} in env
    assert objs["Deployment"]["spec"]["replicas"] == 1  # autoscaling starts at minReplicas


def test_service_monitor_only_when_the_crd_exists_and_wanted():
    _, wanted, _ = children("cpu", has_monitor=True)
    monitor = by_kind(wanted)["ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    _, wanted, absent = children("no-cache", has_monitor=True)
    assert "ServiceMonitor" not in by_kind(wanted) and ("ServiceMonitor", "svc") in absent
    _, wanted, absent = children("cpu", has_monitor=False)
    assert "ServiceMonitor" not in by_kind(wanted) and all(kind != "ServiceMonitor" for kind, _ in absent)


def test_legacy_model_cache_disabled_is_a_per_pod_empty_dir():
    _, wanted, absent = children("no-cache")
    assert "PersistentVolumeClaim" not in by_kind(wanted) and ("PersistentVolumeClaim", "svc-model-cache") in absent
    volume = next(v for v in by_kind(wanted)["Deployment"]["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "model-cache")
    assert volume == {"name": "model-cache", "emptyDir": {"sizeLimit": "50Gi"}}


def test_desired_replicas_follow_the_autoscaler_within_bounds():
    spec = parse_spec(SPECS["one-gpu-autoscaled"], "img")
    assert desired_replicas(spec, {}) == 1
    assert desired_replicas(spec, {"desiredReplicas": 5}) == 5
    assert desired_replicas(spec, {"desiredReplicas": 5}, live_replicas=3) == 3
    assert desired_replicas(spec, {}, live_replicas=20) == 8
    fixed = parse_spec(SPECS["cpu"], "img")
    assert desired_replicas(fixed, {"desiredReplicas": 5}, live_replicas=3) == 1


def test_server_args_use_the_tgi_launcher_flags():
    spec = parse_spec({"model": {"id": "m", "revision": "r"}, "server": {"maxConcurrentRequests": 7}}, "img")
    args = server_args(spec)
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert pairs["--model-id"] == "m" and pairs["--revision"] == "r" and pairs["--max-concurrent-requests"] == "7"
    assert "--json-output" in args


def test_builders_are_pure():
    spec = parse_spec(SPECS["tensor-parallel"], "img")
    assert build_deployment("a", "ns", spec, SETTINGS, 2) == build_deployment("a", "ns", spec, SETTINGS, 2)


def test_pod_monitor_instead_of_the_service_monitor():
    spec = parse_spec({"model": {"id": "m"}, "monitoring": {"kind": "PodMonitor"}}, SETTINGS.default_image)
    wanted, absent = build_children("svc", "ns", spec, SETTINGS, 1, True)
    monitor = by_kind(wanted)["PodMonitor"]
    pod_labels = by_kind(wanted)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["relabelings"][0]["targetLabel"] == "service"
    assert "ServiceMonitor" not in by_kind(wanted) and ("ServiceMonitor", "svc") in absent
    _, absent = build_children("svc", "ns", parse_spec({"model": {"id": "m"}}, "img"), SETTINGS, 1, True)
    assert ("PodMonitor", "svc") in absent
