"""The operator chart: lint and render with the real Helm library, validate every manifest, check the objects."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from .support import CHART, K8S_VERSIONS, NAMESPACE, find, helm, render, render_objects, validate_builtin

# One values set per documented option (together they set every leaf of values.yaml; a test checks).
OPTIONS: dict[str, dict] = {
    "defaults": {},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "no-crds": {"crds": {"enabled": False, "keep": False}},
    "crds-not-kept": {"crds": {"keep": False}},
    "service-monitor": {"serviceMonitor": {
        "enabled": True, "namespace": "monitoring", "labels": {"release": "kube-prometheus-stack"},
        "interval": "30s", "scrapeTimeout": "20s", "port": "metrics", "path": "/metrics",
        "selector": {"app.kubernetes.io/managed-by": "genserve-operator"}}},
    "pod-monitor": {"podMonitor": {
        "enabled": True, "namespace": "monitoring", "labels": {"release": "kube-prometheus-stack"},
        "interval": "30s", "scrapeTimeout": "20s", "port": "http", "path": "/metrics",
        "selector": {"app.kubernetes.io/managed-by": "genserve-operator"}, "serviceLabel": "genserve.dev/service"}},
    "operator-pod-monitor": {"operatorPodMonitor": {"enabled": True, "namespace": "monitoring",
                                                    "labels": {"release": "kube-prometheus-stack"}, "interval": "15s"}},
    "prometheus-rule": {"prometheusRule": {
        "enabled": True, "namespace": "monitoring", "labels": {"release": "kube-prometheus-stack"},
        "targetSelector": 'container="server",namespace=~"llm-.*"', "queueWaiting": 20, "kvCacheUsage": 0.9,
        "ttftP90Seconds": 1.5, "for": "5m"}},
    "dashboards-elsewhere": {"dashboards": {"enabled": True, "namespace": "monitoring",
                                            "labels": {"grafana_dashboard": "1"},
                                            "annotations": {"grafana_folder": "genserve"}}},
    "no-dashboards": {"dashboards": {"enabled": False}},
    "no-inference-extension": {"rbac": {"create": True, "inferenceExtension": False}},
    "existing-service-account": {"rbac": {"create": False},
                                 "serviceAccount": {"create": False, "name": "ops-robot",
                                                    "automountServiceAccountToken": True}},
    "service-account-annotations": {"serviceAccount": {"create": True, "name": "genserve-operator",
                                                       "annotations": {"iam.gke.io/gcp-service-account": "x@y.iam"}}},
    "image-pinned": {"image": {"repository": "registry.example.com/genserve-operator", "tag": "0.1.0",
                               "digest": "sha256:" + "a" * 64, "pullPolicy": "Always"},
                     "imagePullSecrets": [{"name": "regcred"}]},
    "operator-tuning": {"defaultServerImage": "registry.example.com/genserve-server:0.1.0",
                        "operator": {"logLevel": "debug", "jsonLogs": False, "peering": "genserve", "healthPort": 9090,
                                     "metricsPort": 9091,
                                     "env": {"GENSERVE_OPERATOR_RECONCILE_INTERVAL_SECONDS": "30"},
                                     "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
                                     "extraArgs": ["--log-prefix"]}},
    "verbose": {"operator": {"logLevel": "verbose"}},
    "paused": {"replicaCount": 0},
    "scheduling": {"nodeSelector": {"kubernetes.io/os": "linux"},
                   "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
                   "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                       "nodeSelectorTerms": [{"matchExpressions": [
                           {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
                   "priorityClassName": "system-cluster-critical", "terminationGracePeriodSeconds": 60,
                   "podAnnotations": {"example.com/team": "ml"}, "podLabels": {"team": "ml"}},
    "resources-and-security": {
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 2000, "runAsGroup": 2000, "fsGroup": 2000,
                               "seccompProfile": {"type": "RuntimeDefault"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "privileged": False, "capabilities": {"drop": ["ALL"]}},
        "livenessProbe": {"initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 6}},
    "names": {"nameOverride": "llm", "fullnameOverride": "llm-operator"},
}


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not path.endswith(("labels", "selector", "resources",
                                                                       "podSecurityContext", "securityContext")):
            out |= _leaves(value, path + ".")
        else:
            out.add(path)
    return out


def test_options_cover_every_value():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    covered = set().union(*(_leaves(v) for v in OPTIONS.values()))
    missing = sorted(p for p in _leaves(defaults) if not any(p == c or p.startswith(c + ".") or c.startswith(p + ".") for c in covered))
    assert not missing, f"values without a lint/render case in OPTIONS: {missing}"


def test_values_documented_key_by_key():
    """Each key has a comment line above it, or sits inside a documented value (e.g. resources.limits)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, stack = [], []  # stack: (indent, documented) of the enclosing keys
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = lines[i - 1].strip().startswith("#") if i else False
        inherited = any(d for _, d in stack)
        is_parent = not match.group(3).strip()
        if not (documented or inherited or is_parent):
            undocumented.append(match.group(2))
        stack.append((indent, documented))
    assert not undocumented, f"values.yaml keys without a comment line above: {undocumented}"


@pytest.mark.parametrize("option", OPTIONS)
def test_lint(option):
    report = helm.lint(CHART, OPTIONS[option], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("option", OPTIONS)
def test_rendered_manifests_validate(option, version):
    objects = render_objects(OPTIONS[option])
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            _check_monitor(obj)
        else:
            validate_builtin(obj, version)


def _check_monitor(obj: dict) -> None:
    """kubernetes-validate has no Prometheus Operator schemas: check the fields we set by hand."""
    assert obj["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    if obj["kind"] == "PrometheusRule":
        for group in spec["groups"]:
            assert set(group) == {"name", "rules"}
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"} and rule["expr"].strip()
                assert re.fullmatch(r"\d+(ms|s|m|h)", rule["for"])
        return
    assert spec["selector"]["matchLabels"]
    assert spec["namespaceSelector"] == {"any": True} or spec["namespaceSelector"]["matchNames"]
    endpoints = spec["endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
    allowed = {"port", "path", "interval", "scrapeTimeout", "relabelings", "honorLabels"}
    for endpoint in endpoints:
        assert set(endpoint) <= allowed, set(endpoint) - allowed
        assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint["interval"])
        assert endpoint["path"].startswith("/")


def _deployment(values: dict | None = None) -> dict:
    (deployment,) = find(render_objects(values), "Deployment")
    return deployment


def test_operator_deployment_defaults():
    deployment = _deployment()
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["kopf", "run", "-m", "genserve.operator.main"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert "--all-namespaces" in container["args"]
    assert "--standalone" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["image"] == "ghcr.io/genserve/genserve-operator:0.1.0"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_operator_options_reach_the_container():
    deployment = _deployment(OPTIONS["operator-tuning"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert "--liveness=http://0.0.0.0:9090/healthz" in args
    assert "--peering=genserve" in args and "--standalone" not in args
    assert "--debug" in args and "--log-format=json" not in args and args[-1] == "--log-prefix"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GENSERVE_OPERATOR_DEFAULT_IMAGE"] == "registry.example.com/genserve-server:0.1.0"
    assert env["GENSERVE_OPERATOR_PEERING"] == "genserve"
    assert env["GENSERVE_OPERATOR_METRICS_PORT"] == "9091"
    assert {"name": "metrics", "containerPort": 9091, "protocol": "TCP"} in container["ports"]
    assert env["GENSERVE_OPERATOR_RECONCILE_INTERVAL_SECONDS"] == "30"
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    image = _deployment(OPTIONS["image-pinned"])["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/genserve-operator@sha256:" + "a" * 64


REQUIRED_NAMESPACED = {
    ("genserve.dev", "textgenerationservices", "watch"), ("genserve.dev", "textgenerationservices", "patch"),
    ("genserve.dev", "textgenerationservices/status", "patch"),
    ("apps", "deployments", "create"), ("apps", "deployments", "patch"), ("apps", "deployments", "delete"),
    ("", "services", "create"), ("networking.k8s.io", "ingresses", "create"),
    ("policy", "poddisruptionbudgets", "create"), ("", "persistentvolumeclaims", "create"),
    ("", "secrets", "get"), ("", "events", "create"), ("", "pods", "list"),
    ("monitoring.coreos.com", "servicemonitors", "create"), ("monitoring.coreos.com", "podmonitors", "create"),
    ("batch", "jobs", "create"), ("batch", "jobs", "watch"), ("batch", "jobs", "delete"),
    ("inference.networking.k8s.io", "inferencepools", "create"),
    ("inference.networking.k8s.io", "inferencepools", "delete"),
    ("gateway.networking.k8s.io", "httproutes", "create"), ("gateway.networking.k8s.io", "httproutes", "delete"),
}
# exactly what the operator calls, per mode, is tested in tests/operator/test_operator_rbac.py
REQUIRED_CLUSTER = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
}


def _grants(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_rbac_cluster_wide():
    objects = render_objects()
    (role,) = find(objects, "ClusterRole")
    assert REQUIRED_NAMESPACED | REQUIRED_CLUSTER <= _grants(role)
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
    (binding,) = find(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "genserve", "namespace": NAMESPACE}]
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])
    assert {v for g, r, v in _grants(role) if r == "secrets"} == {"get"}, "Secrets: read by name only"


def test_rbac_namespaced_by_watch_namespaces():
    objects = render_objects(OPTIONS["watch-namespaces"])
    roles = find(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(REQUIRED_NAMESPACED <= _grants(r) for r in roles)
    assert sorted(b["metadata"]["namespace"] for b in find(objects, "RoleBinding")) == ["team-a", "team-b"]
    (cluster_role,) = find(objects, "ClusterRole")
    grants = _grants(cluster_role)
    assert REQUIRED_CLUSTER <= grants
    assert not {g for g in grants if g[0] in ("apps", "genserve.dev") or g[1] in ("secrets", "pods")}
    args = find(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_rbac_without_the_inference_extension():
    (role,) = find(render_objects(OPTIONS["no-inference-extension"]), "ClusterRole")
    groups = {g for g, _, _ in _grants(role)}
    assert "batch" in groups and not groups & {"inference.networking.k8s.io", "gateway.networking.k8s.io"}


def test_rbac_and_service_account_can_be_external():
    objects = render_objects(OPTIONS["existing-service-account"])
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}
    assert _deployment(OPTIONS["existing-service-account"])["spec"]["template"]["spec"]["serviceAccountName"] == \
        "ops-robot"


def test_crd_switches():
    (crd,) = find(render_objects(), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    (crd,) = find(render_objects(OPTIONS["crds-not-kept"]), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})
    assert not find(render_objects(OPTIONS["no-crds"]), "CustomResourceDefinition")


def test_monitors_off_by_default_and_selecting_model_pods():
    assert not [o for o in render_objects() if o["apiVersion"].startswith("monitoring.coreos.com/")]
    (monitor,) = find(render_objects(OPTIONS["service-monitor"]), "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (pod_monitor,) = find(render_objects(OPTIONS["pod-monitor"]), "PodMonitor")
    (relabel,) = pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert relabel == {"sourceLabels": ["__meta_kubernetes_pod_label_genserve_dev_service"], "targetLabel": "service"}
    scoped = render_objects({**OPTIONS["watch-namespaces"], "serviceMonitor": {"enabled": True}})
    assert find(scoped, "ServiceMonitor")[0]["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_prometheus_rule_alerts_on_the_model_signals():
    assert not find(render_objects(), "PrometheusRule")
    (rule,) = find(render_objects(OPTIONS["prometheus-rule"]), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"GenserveServerDown", "GenserveQueueGrowing", "GenserveKvCacheNearFull",
                           "GenserveTimeToFirstTokenHigh", "GenserveAutoscalerAtMaxReplicas"}
    assert alerts["GenserveServerDown"]["expr"] == 'up{container="server",namespace=~"llm-.*"} == 0'
    assert "genserve_num_requests_waiting) > 20" in alerts["GenserveQueueGrowing"]["expr"]
    assert alerts["GenserveKvCacheNearFull"]["expr"].endswith("> 0.9")
    assert "genserve_time_to_first_token_seconds_bucket[5m]" in alerts["GenserveTimeToFirstTokenHigh"]["expr"]
    assert alerts["GenserveTimeToFirstTokenHigh"]["expr"].endswith("> 1.5") and alerts["GenserveQueueGrowing"]["for"] == "5m"
    # Prometheus' own templates survive Helm's
    assert "{{ $labels.service }}" in alerts["GenserveKvCacheNearFull"]["annotations"]["summary"]
    assert all(a["labels"]["severity"] in ("critical", "warning") for a in alerts.values())


def test_dashboards_as_sidecar_configmaps():
    maps = find(render_objects(), "ConfigMap")
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert len(maps) == len(files) >= 2
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / key).read_text())
    moved = find(render_objects(OPTIONS["dashboards-elsewhere"]), "ConfigMap")
    assert {cm["metadata"]["namespace"] for cm in moved} == {"monitoring"}
    assert all(cm["metadata"]["annotations"] == {"grafana_folder": "genserve"} for cm in moved)
    assert not find(render_objects(OPTIONS["no-dashboards"]), "ConfigMap")


def test_notes_tell_what_to_apply_next():
    notes = render()["genserve/templates/NOTES.txt"]
    assert "kubectl apply -f examples/smollm2-cpu.yaml" in notes
    assert "kubectl get tgs" in notes
    assert "kubectl apply" in render(OPTIONS["no-crds"])["genserve/templates/NOTES.txt"].split("1. Check")[0]


@pytest.mark.parametrize(("values", "where", "says"), [
    ({"replicaCount": "two"}, "/replicaCount", "got string, want integer"),
    ({"replicaCount": 2}, "/replicaCount", "maximum"),
    ({"replicaCuont": 1}, "additional properties 'replicaCuont' not allowed", ""),
    ({"image": {"tagg": "0.1.0"}}, "/image", "additional properties 'tagg' not allowed"),
    ({"watchNamespaces": "team-a"}, "/watchNamespaces", "want array"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0", "does not match pattern"),
    ({"operator": {"logLevel": "loud"}}, "/operator/logLevel", "value must be one of"),
    ({"crds": {"enabled": "yes"}}, "/crds/enabled", "want boolean"),
    ({"serviceMonitor": {"enabled": True, "interval": "15 seconds"}}, "/serviceMonitor/interval", "pattern"),
    ({"image": {"digest": "latest"}}, "/image/digest", "pattern"),
])
def test_schema_rejects_bad_values(values, where, says):
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError) as raised:
        chart.validate_schema(values)
    message = str(raised.value)
    assert where in message and says in message, message
    with pytest.raises(helm.HelmValuesError):
        chart.render(values)
    chart.close()


def test_schema_forbids_unknown_keys_everywhere():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict, path: str) -> list[str]:
        bad = []
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            bad.append(path or "/")
        for key, child in node.get("properties", {}).items():
            bad += walk(child, f"{path}/{key}")
        if isinstance(node.get("items"), dict):
            bad += walk(node["items"], path + "/items")
        return bad

    assert not walk(schema, "")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) == set(schema["properties"])


@pytest.mark.parametrize("option", ["defaults", "watch-namespaces", "operator-tuning", "verbose"])
def test_operator_command_line_parses_with_kopf(option):
    """The Deployment's command and args are accepted by the installed kopf's own CLI parser."""
    cli = pytest.importorskip("kopf.cli")
    (container,) = _deployment(OPTIONS[option])["spec"]["template"]["spec"]["containers"]
    command, args = container["command"], container["args"]
    assert command[:2] == ["kopf", "run"]
    params = cli.run.make_context("run", command[2:] + args).params
    assert params["modules"] == ("genserve.operator.main",)
    assert params["liveness_endpoint"].endswith("/healthz")
    assert params["clusterwide"] != bool(params["namespaces"])


def test_prometheus_rule_passes_promtool(tmp_path):
    """The rendered rules as Prometheus itself parses them (Debian's `prometheus` package ships promtool)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    (rule,) = find(render_objects(OPTIONS["prometheus-rule"]), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 rules found" in result.stdout
    # and Prometheus' rule engine on synthetic series: each alert fires on its signal, none on a healthy one
    where = {"namespace": "llm-a", "service": "chat"}
    labels = 'namespace="llm-a",service="chat"'
    ttft = 'genserve_time_to_first_token_seconds_bucket{' + labels + ',le="%s"}'

    def series(up, kv, waiting, slow):
        return [{"series": 'up{container="server",namespace="llm-a",pod="chat-0"}', "values": up},
                {"series": "genserve_kv_cache_usage_ratio{" + labels + ',pod="chat-0"}', "values": kv},
                {"series": "genserve_num_requests_waiting{" + labels + ',pod="chat-0"}', "values": waiting},
                {"series": ttft % "1", "values": "0+0x30" if slow else "0+10x30"},
                {"series": ttft % "5", "values": "0+10x30"}, {"series": ttft % "+Inf", "values": "0+10x30"}]

    def firing(name, severity, summary, **extra):
        return {"eval_time": "20m", "alertname": name, "exp_alerts": [
            {"exp_labels": {"severity": severity, **extra}, "exp_annotations": {"summary": summary}}]}

    alerts = [firing("GenserveServerDown", "critical", "genserve server llm-a/chat-0 is not answering /metrics",
                     container="server", namespace="llm-a", pod="chat-0"),
              firing("GenserveKvCacheNearFull", "warning", "llm-a/chat: KV cache 97% full; requests get preempted",
                     **where),
              firing("GenserveQueueGrowing", "warning", "llm-a/chat: 50 requests waiting and the queue still grows",
                     **where),
              firing("GenserveTimeToFirstTokenHigh", "warning", "llm-a/chat: TTFT p90 4.6s", **where)]
    quiet = [{"eval_time": "20m", "alertname": a["alertname"], "exp_alerts": []} for a in alerts]
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": [path.name], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": series("0x30", "0.97x30", "30+1x30", slow=True), "alert_rule_test": alerts},
        {"interval": "1m", "input_series": series("1x30", "0.5x30", "25x30", slow=False), "alert_rule_test": quiet}]}))
    result = subprocess.run([promtool, "test", "rules", "test.yaml"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
