"""Pure builders: a parsed TextGenerationService spec in, Kubernetes manifests (plain dicts) out."""

from __future__ import annotations

import math
from typing import Any

from genserve.operator import adapter_volumes, cache_volumes, gateway_routes
from genserve.operator.cache_volumes import CACHE_MOUNT
from genserve.operator.settings import FIELD_MANAGER, SERVICE_LABEL, OperatorSettings
from genserve.operator.spec import ServiceSpec

HTTP_PORT = 8080
SERVICE_PORT = 80
PROBE_PERIOD_SECONDS = 10


def selector(name: str) -> dict[str, str]:
    return {SERVICE_LABEL: name}


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "genserve",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "server",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        **selector(name),
    }


def _meta(name: str, namespace: str, object_name: str | None = None) -> dict[str, Any]:
    return {"name": object_name or name, "namespace": namespace, "labels": labels(name)}


def endpoint(name: str, namespace: str, cluster_domain: str) -> str:
    return f"http://{name}.{namespace}.svc.{cluster_domain}/v1"


def server_args(spec: ServiceSpec) -> list[str]:
    s = spec.server
    args = ["serve", "--model-id", spec.model.id, "--revision", spec.model.revision, "--port", str(HTTP_PORT),
            "--max-concurrent-requests", str(s.max_concurrent_requests),
            "--graceful-termination-timeout", str(s.graceful_termination_seconds),
            "--huggingface-hub-cache", f"{CACHE_MOUNT}/hub", "--json-output"]
    if spec.shards > 1:
        args += ["--num-shard", str(spec.shards)]
    for flag, value in (("--max-input-tokens", s.max_input_tokens), ("--max-total-tokens", s.max_total_tokens),
                        ("--dtype", s.dtype), ("--quantize", s.quantize)):
        if value is not None:
            args += [flag, str(value)]
    if spec.metrics_compat:
        args += ["--metrics-compat", ",".join(spec.metrics_compat)]
    return args + adapter_volumes.server_flags(spec) + list(s.extra_args)


def _resources(spec: ServiceSpec) -> dict[str, Any]:
    requests = dict(spec.resources.get("requests") or {})
    limits = dict(spec.resources.get("limits") or {})
    if spec.shards > 0:
        # extended resources need limits, and requests equal to limits
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = str(spec.shards)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probe(path: str, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": timeout}


def _volumes(name: str, spec: ServiceSpec, settings: OperatorSettings) -> tuple[list[dict], list[dict]]:
    source_volumes, source_mounts = cache_volumes.source_volumes(spec)
    adapter_sources, adapter_mounts = adapter_volumes.source_volumes(spec)
    source_volumes, source_mounts = source_volumes + adapter_sources, source_mounts + adapter_mounts
    volumes = [cache_volumes.cache_volume(name, spec), {"name": "tmp", "emptyDir": {}}, *source_volumes]
    mounts = [cache_volumes.cache_mount(spec, for_server=True), {"name": "tmp", "mountPath": "/tmp"},
              *source_mounts]
    if spec.is_sharded:
        # NCCL needs a large /dev/shm for tensor parallelism; the container default is 64 MiB
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _init_containers(spec: ServiceSpec) -> list[dict[str, Any]]:
    """The download steps (model, adapters), unless the fill Job has done them once for all (pvc:// sources
    need none)."""
    if cache_volumes.uses_fill_job(spec):
        return []
    model = [cache_volumes.download_container(spec, _container_security())] if spec.model.needs_download else []
    return model + adapter_volumes.fetch_containers(spec, _container_security())


def build_deployment(name: str, namespace: str, spec: ServiceSpec, settings: OperatorSettings,
                     replicas: int) -> dict[str, Any]:
    volumes, mounts = _volumes(name, spec, settings)
    main_env = cache_volumes.cache_env(spec, for_server=True) + list(spec.server.env)
    if spec.api_key_secret:
        ref = spec.api_key_secret
        main_env.append({"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    startup_failures = max(1, math.ceil(spec.server.startup_timeout_seconds / PROBE_PERIOD_SECONDS))
    server = {
        "name": "server",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["genserve"],
        "args": server_args(spec),
        "env": main_env,
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "startupProbe": _probe("/health", PROBE_PERIOD_SECONDS, startup_failures),
        "readinessProbe": _probe("/health", 5, 3),
        # /health is readiness and 503 while draining: liveness on it would kill a drain longer than 60 s
        "livenessProbe": _probe("/live", 10, 6),
        # let endpoints drop the pod before SIGTERM starts the server's drain
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(settings.prestop_sleep_seconds)]}}},
        "securityContext": _container_security(),
    }
    tolerations = list(spec.tolerations)
    if spec.shards > 0 and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    pod_spec: dict[str, Any] = {
        "containers": [server],
        "volumes": volumes,
        "terminationGracePeriodSeconds": spec.server.graceful_termination_seconds + settings.prestop_sleep_seconds + 5,
        "securityContext": _pod_security(),
        "enableServiceLinks": False,
    }
    if init := _init_containers(spec):
        pod_spec["initContainers"] = init
    optional = {"nodeSelector": spec.node_selector, "tolerations": tolerations, "affinity": spec.affinity,
                "serviceAccountName": spec.service_account_name,
                "imagePullSecrets": [{"name": s} for s in spec.image_pull_secrets]}
    pod_spec.update({k: v for k, v in optional.items() if v})
    pod_meta: dict[str, Any] = {"labels": {**spec.pod_labels, **labels(name)}}
    if spec.pod_annotations:
        pod_meta["annotations"] = dict(spec.pod_annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, namespace),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(name)},
            "strategy": _strategy(spec),
            "progressDeadlineSeconds": spec.server.startup_timeout_seconds + 600,
            "template": {"metadata": pod_meta, "spec": pod_spec},
        },
    }


def _strategy(spec: ServiceSpec) -> dict[str, Any]:
    if cache_volumes.is_single_node_claim(spec):
        # a surge pod on another node could never mount the one-node claim
        return {"type": "Recreate"}
    # a surge pod needs spare GPUs; never take a serving replica away first
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def build_service(name: str, namespace: str, to_activator: bool = False) -> dict[str, Any]:
    """The service's address. While no server pod is ready in a scale-to-zero service it selects the
    activator instead, which holds requests until one is (and shows its own metrics on `metrics`)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace),
        "spec": {
            "type": "ClusterIP",
            "selector": activator_selector(name) if to_activator else selector(name),
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": HTTP_PORT, "targetPort": "metrics" if to_activator else "http",
                 "protocol": "TCP"},
            ],
        },
    }


# ---- scale to zero: the activator and the Service it forwards to ------------------------------------

ACTIVATOR_LABEL = "genserve.dev/activator"
ACTIVATOR_PORT, ACTIVATOR_METRICS_PORT = 8080, 9090


def activator_name(name: str) -> str:
    return f"{name}-activator"


def direct_service_name(name: str) -> str:
    return f"{name}-direct"


def activator_selector(name: str) -> dict[str, str]:
    # not SERVICE_LABEL: the server Deployment, its PDB and the autoscaler select pods by that one
    return {ACTIVATOR_LABEL: name}


def _component_meta(name: str, namespace: str, object_name: str, component: str) -> dict[str, Any]:
    meta = _meta(name, namespace, object_name)
    meta["labels"]["app.kubernetes.io/component"] = component
    return meta


def build_direct_service(name: str, namespace: str) -> dict[str, Any]:
    """Always the server pods: where the activator sends the requests it held."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _component_meta(name, namespace, direct_service_name(name), "server-direct"),
        "spec": {"type": "ClusterIP", "selector": selector(name),
                 "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}]},
    }


def build_activator(name: str, namespace: str, spec: ServiceSpec, settings: OperatorSettings) -> dict[str, Any]:
    target = f"http://{direct_service_name(name)}.{namespace}.svc.{settings.cluster_domain}:{SERVICE_PORT}"
    pod_labels = {"app.kubernetes.io/name": "genserve", "app.kubernetes.io/instance": name,
                  "app.kubernetes.io/component": "activator", **activator_selector(name)}
    container = {
        "name": "activator",
        "image": settings.activator_image,
        "command": ["python", "-m", "genserve.operator.activator", "--target", target,
                    "--port", str(ACTIVATOR_PORT), "--metrics-port", str(ACTIVATOR_METRICS_PORT)],
        "ports": [{"name": "http", "containerPort": ACTIVATOR_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": ACTIVATOR_METRICS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 20,
                          "failureThreshold": 3},
        # a proxy that mostly waits: small, and never on a GPU node's accelerators
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": _container_security(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _component_meta(name, namespace, activator_name(name), "activator"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": activator_selector(name)},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {"containers": [container], "automountServiceAccountToken": False,
                         # the service's pull secrets: a private registry usually holds both images
                         "imagePullSecrets": [{"name": s} for s in spec.image_pull_secrets],
                         "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001}},
            },
        },
    }


def build_pdb(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, namespace),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }


def build_ingress(name: str, namespace: str, spec: ServiceSpec) -> dict[str, Any]:
    ing = spec.ingress
    backend = {"service": {"name": name, "port": {"name": "http"}}}
    ing_spec: dict[str, Any] = {"rules": [{"host": ing.host, "http": {"paths": [
        {"path": ing.path, "pathType": "Prefix", "backend": backend}]}}]}
    if ing.class_name:
        ing_spec["ingressClassName"] = ing.class_name
    if ing.tls_secret_name:
        ing_spec["tls"] = [{"hosts": [ing.host], "secretName": ing.tls_secret_name}]
    meta = _meta(name, namespace)
    if ing.annotations:
        meta["annotations"] = dict(ing.annotations)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": ing_spec}


def build_service_monitor(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(name, namespace),
        # the main Service only (not <name>-direct: the same pods twice)
        "spec": {"selector": {"matchLabels": {**selector(name), "app.kubernetes.io/component": "server"}},
                 "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}]},
    }


def build_pod_monitor(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(name, namespace),
        "spec": {"selector": {"matchLabels": {**selector(name), "app.kubernetes.io/component": "server"}},
                 "podMetricsEndpoints": [{
                     "port": "http", "path": "/metrics", "interval": "15s",
                     # the `service` label the dashboards group by, as a ServiceMonitor would set it
                     "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_label_genserve_dev_service"],
                                      "targetLabel": "service"}]}]},
    }


def desired_replicas(spec: ServiceSpec, status: dict[str, Any], live_replicas: int | None = None) -> int:
    """Replicas the Deployment should run. With autoscaling the autoscaler owns the live count (then its
    last decision in status), clamped to the current bounds; otherwise spec.replicas."""
    if not spec.autoscaling.enabled:
        return spec.replicas
    current = live_replicas if live_replicas is not None else status.get("desiredReplicas")
    if current is None:  # a new service starts warm, even one that may scale to zero later
        current = max(spec.autoscaling.min_replicas, 1)
    return max(spec.autoscaling.min_replicas, min(spec.autoscaling.max_replicas, int(current)))


def routes_to_activator(spec: ServiceSpec, deployment: dict[str, Any] | None) -> bool:
    """A scale-to-zero service sends traffic to its activator while no server pod is ready, and from
    the moment it is scaled to zero (its last pods drain while new requests already wait there)."""
    ready = ((deployment or {}).get("status") or {}).get("readyReplicas") or 0
    scaled_to_zero = deployment is not None and (deployment.get("spec") or {}).get("replicas") == 0
    return spec.scales_to_zero and (ready == 0 or scaled_to_zero)


def build_fill_job(name: str, namespace: str, spec: ServiceSpec) -> dict[str, Any]:
    return cache_volumes.build_fill_job(name, namespace, spec, labels(name), _pod_security(), _container_security(),
                                        adapter_volumes.fetch_containers(spec, _container_security()))


def build_children(name: str, namespace: str, spec: ServiceSpec, settings: OperatorSettings, replicas: int,
                   has_service_monitor: bool = False, to_activator: bool = False, cache_filled: bool = True,
                   has_inference_pool: bool = False) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """All children to apply, and the (kind, name) of optional children that must not exist. With a
    shared cache the Deployment is only wanted once the fill Job has filled the claim (cache_filled);
    until then it is neither applied nor removed."""
    wanted = [build_service(name, namespace, to_activator)]
    if cache_filled or not cache_volumes.uses_fill_job(spec):
        wanted.insert(0, build_deployment(name, namespace, spec, settings, replicas))
    else:
        wanted.insert(0, build_fill_job(name, namespace, spec))
    absent: list[tuple[str, str]] = []
    if spec.scales_to_zero:
        wanted += [build_direct_service(name, namespace), build_activator(name, namespace, spec, settings)]
    else:
        absent += [("Deployment", activator_name(name)), ("Service", direct_service_name(name))]
    if spec.cache.is_shared and not spec.cache.existing_claim:
        wanted.insert(0, cache_volumes.build_cache_pvc(name, namespace, spec, labels(name)))
    else:
        # a claim created for an earlier shared (or pre-`cache`) spec; Kubernetes keeps it while pods use it
        absent.append(("PersistentVolumeClaim", f"{name}-model-cache"))
    optional = [("PodDisruptionBudget", spec.max_replicas > 1, lambda: build_pdb(name, namespace)),
                ("Ingress", spec.ingress.enabled, lambda: build_ingress(name, namespace, spec))]
    if has_service_monitor:  # the Prometheus Operator's CRDs: ServiceMonitor and PodMonitor come together
        by_pod = spec.monitor_kind == "PodMonitor"
        optional += [("ServiceMonitor", spec.monitoring and not by_pod, lambda: build_service_monitor(name, namespace)),
                     ("PodMonitor", spec.monitoring and by_pod, lambda: build_pod_monitor(name, namespace))]
    if not spec.inference_pool.enabled:
        absent += [("InferencePool", name), ("HTTPRoute", name)]  # a GET of an API not served is a 404
    elif has_inference_pool:
        wanted += [gateway_routes.build_inference_pool(name, namespace, spec, labels(name), HTTP_PORT),
                   gateway_routes.build_http_route(name, namespace, spec, labels(name))]
    for kind, is_wanted, build in optional:
        if is_wanted:
            wanted.append(build())
        else:
            absent.append((kind, name))
    return wanted, absent
