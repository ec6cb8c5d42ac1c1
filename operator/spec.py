"""The TextGenerationService spec as typed dataclasses, with the CRD's defaults and cross-field rules.

The API server applies the CRD's defaults and validation on a real cluster; parsing here again keeps the
operator safe against objects written before a schema change, and turns a bad spec into a `Degraded`
condition instead of a crash loop. `tests/operator/test_crd.py` checks these defaults against the CRD.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from genserve.operator.adapters import AdapterSpec, parse_adapters
from genserve.operator.model_source import ModelSpec, SecretKeyRef, SourceError, parse_model

QUANTIZE = ("awq", "gptq", "marlin", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8", "eetq",
            "exl2", "compressed-tensors")
DTYPES = ("float16", "bfloat16", "float32")
MAX_SHARDS = 8


class SpecError(ValueError):
    """An invalid spec: `reason` becomes the Degraded condition's reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class AutoscalingSpec:
    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    target_queue_depth: float = 4.0
    target_kv_cache_usage: float = 0.5
    tolerance: float = 0.1
    interval_seconds: int = 15
    scale_up_stabilization_seconds: int = 0
    scale_down_stabilization_seconds: int = 300
    max_scale_up_step: int = 4
    max_scale_down_step: int = 1
    metrics_source: str = "pods"
    prometheus_url: str | None = None
    # minReplicas 0: scale to zero after this long without a request (vLLM production-stack's default)
    scale_to_zero_after_seconds: int = 1800


@dataclass(slots=True)
class ServerSpec:
    max_concurrent_requests: int = 128
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    quantize: str | None = None
    dtype: str | None = None
    graceful_termination_seconds: int = 90
    startup_timeout_seconds: int = 1800
    extra_args: list[str] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)


CACHE_MODES = ("perPod", "shared")
PER_POD_VOLUMES = ("ephemeral", "emptyDir")
ACCESS_MODES = ("ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce", "ReadWriteOncePod")
SINGLE_NODE_ACCESS_MODES = ("ReadWriteOnce", "ReadWriteOncePod")


@dataclass(slots=True)
class CacheSpec:
    """perPod: every replica fills its own volume in its init step. shared: one claim, filled once by a
    Job before any pod starts, then mounted read-only by every replica."""
    mode: str = "perPod"
    volume: str = "ephemeral"  # perPod: a generic ephemeral volume (storage class) or a sized emptyDir
    size: str = "50Gi"
    storage_class_name: str | None = None
    access_mode: str = "ReadWriteMany"  # shared only
    existing_claim: str | None = None
    # translated from the deprecated spec.modelCache: the claim keeps its old name and access mode
    is_legacy: bool = False

    @property
    def is_shared(self) -> bool:
        return self.mode == "shared"


@dataclass(slots=True)
class GatewayRef:
    name: str
    namespace: str | None = None
    section_name: str | None = None


@dataclass(slots=True)
class InferencePoolSpec:
    enabled: bool = False
    gateway: GatewayRef | None = None
    picker_name: str | None = None  # the endpoint picker's Service; <name>-epp when unset
    picker_port: int = 9002
    failure_mode: str = "FailClose"


@dataclass(slots=True)
class IngressSpec:
    enabled: bool = False
    host: str | None = None
    class_name: str | None = None
    path: str = "/"
    tls_secret_name: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ServiceSpec:
    model: ModelSpec
    image: str = ""
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = field(default_factory=list)
    shards: int = 1
    replicas: int = 1
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)
    server: ServerSpec = field(default_factory=ServerSpec)
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    cache: CacheSpec = field(default_factory=CacheSpec)
    ingress: IngressSpec = field(default_factory=IngressSpec)
    inference_pool: InferencePoolSpec = field(default_factory=InferencePoolSpec)
    api_key_secret: SecretKeyRef | None = None
    service_account_name: str | None = None
    pod_annotations: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] = field(default_factory=dict)
    monitoring: bool = True
    # PodMonitor scrapes every server pod, also while the Service points at the activator
    monitor_kind: str = "ServiceMonitor"
    # metric name sets the server exports beside TGI's (--metrics-compat), e.g. ["vllm"] for the endpoint picker
    metrics_compat: list[str] = field(default_factory=list)
    adapters: list[AdapterSpec] = field(default_factory=list)
    max_loras: int | None = None

    @property
    def is_sharded(self) -> bool:
        return self.shards > 1

    @property
    def scales_to_zero(self) -> bool:
        return self.autoscaling.enabled and self.autoscaling.min_replicas == 0

    @property
    def min_replicas(self) -> int:
        return self.autoscaling.min_replicas if self.autoscaling.enabled else self.replicas

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling.enabled else self.replicas


def _secret_ref(raw: dict[str, Any] | None, default_key: str, where: str) -> SecretKeyRef | None:
    if not raw:
        return None
    if not raw.get("name"):
        raise SpecError("InvalidSecretRef", f"{where}.name is required")
    return SecretKeyRef(name=raw["name"], key=raw.get("key") or default_key)


def parse_cache(raw: dict[str, Any], legacy: dict[str, Any] | None) -> CacheSpec:
    """`spec.cache`; without it, the deprecated `spec.modelCache` keeps meaning what it meant: a claim
    named <name>-model-cache (or existingClaim) shared by every replica, or an emptyDir when disabled."""
    d, w = _defaults(CacheSpec), "spec.cache"
    if not raw and legacy is not None:
        if not legacy.get("enabled", True):
            return CacheSpec(mode="perPod", volume="emptyDir", size=legacy.get("size", d["size"]), is_legacy=True)
        return CacheSpec(mode="shared", size=legacy.get("size", d["size"]),
                         storage_class_name=legacy.get("storageClassName"),
                         access_mode=legacy.get("accessMode", "ReadWriteOnce"),
                         existing_claim=legacy.get("existingClaim"), is_legacy=True)
    spec = CacheSpec(mode=raw.get("mode", d["mode"]), volume=raw.get("volume", d["volume"]),
                     size=raw.get("size", d["size"]), storage_class_name=raw.get("storageClassName"),
                     access_mode=raw.get("accessMode", d["access_mode"]), existing_claim=raw.get("existingClaim"))
    if spec.mode not in CACHE_MODES:
        raise SpecError("InvalidField", f"{w}.mode must be one of {', '.join(CACHE_MODES)}")
    if spec.volume not in PER_POD_VOLUMES:
        raise SpecError("InvalidField", f"{w}.volume must be one of {', '.join(PER_POD_VOLUMES)}")
    if spec.mode == "perPod" and spec.existing_claim:
        raise SpecError("InvalidField", f"{w}.existingClaim needs mode shared")
    return spec


def parse_inference_pool(raw: dict[str, Any]) -> InferencePoolSpec:
    w = "spec.routing.inferencePool"
    if not raw.get("enabled", False):
        return InferencePoolSpec()
    gateway, picker = raw.get("gatewayRef") or {}, raw.get("endpointPicker") or {}
    if not gateway.get("name"):
        raise SpecError("InvalidInferencePool", f"{w}.gatewayRef.name is required when the pool is enabled")
    spec = InferencePoolSpec(
        enabled=True, gateway=GatewayRef(gateway["name"], gateway.get("namespace"), gateway.get("sectionName")),
        picker_name=picker.get("name"), picker_port=_int(picker, "port", 9002, 1, 65535, f"{w}.endpointPicker"),
        failure_mode=picker.get("failureMode", "FailClose"))
    if spec.failure_mode not in ("FailOpen", "FailClose"):
        raise SpecError("InvalidField", f"{w}.endpointPicker.failureMode must be FailOpen or FailClose")
    return spec


def check_cache_fits_replicas(spec: ServiceSpec) -> None:
    """A single-node claim shared by replicas that may land on other nodes would leave them Pending or
    crash-looping on the mount; refuse it up front."""
    cache = spec.cache
    if cache.is_shared and cache.access_mode in SINGLE_NODE_ACCESS_MODES and spec.max_replicas > 1:
        where = "spec.modelCache" if cache.is_legacy else "spec.cache"
        raise SpecError("CacheNotShareable",
                        f"{where}.accessMode {cache.access_mode} allows one node, but up to {spec.max_replicas} "
                        f"replicas may run: use cache.mode perPod, or a ReadWriteMany/ReadOnlyMany claim")


def _int(raw: dict[str, Any], key: str, default: int | None, lo: int | None = None, hi: int | None = None,
         where: str = "spec") -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError("InvalidField", f"{where}.{key} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise SpecError("InvalidField", f"{where}.{key} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise SpecError("InvalidField", f"{where}.{key} must be <= {hi}, got {value}")
    return value


def _num(raw: dict[str, Any], key: str, default: float, lo: float, hi: float | None, where: str) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError("InvalidField", f"{where}.{key} must be a number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise SpecError("InvalidField", f"{where}.{key} must be in [{lo}, {hi if hi is not None else 'inf'}]")
    return float(value)


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def parse_autoscaling(raw: dict[str, Any]) -> AutoscalingSpec:
    d, w = _defaults(AutoscalingSpec), "spec.autoscaling"
    spec = AutoscalingSpec(
        enabled=bool(raw.get("enabled", d["enabled"])),
        min_replicas=_int(raw, "minReplicas", d["min_replicas"], 0, where=w),
        max_replicas=_int(raw, "maxReplicas", d["max_replicas"], 1, where=w),
        target_queue_depth=_num(raw, "targetQueueDepth", d["target_queue_depth"], 0.1, None, w),
        target_kv_cache_usage=_num(raw, "targetKvCacheUsage", d["target_kv_cache_usage"], 0.05, 1.0, w),
        tolerance=_num(raw, "tolerance", d["tolerance"], 0.0, 0.9, w),
        interval_seconds=_int(raw, "intervalSeconds", d["interval_seconds"], 1, 3600, w),
        scale_up_stabilization_seconds=_int(raw, "scaleUpStabilizationSeconds",
                                            d["scale_up_stabilization_seconds"], 0, 3600, w),
        scale_down_stabilization_seconds=_int(raw, "scaleDownStabilizationSeconds",
                                              d["scale_down_stabilization_seconds"], 0, 3600, w),
        max_scale_up_step=_int(raw, "maxScaleUpStep", d["max_scale_up_step"], 1, where=w),
        max_scale_down_step=_int(raw, "maxScaleDownStep", d["max_scale_down_step"], 1, where=w),
        metrics_source=raw.get("metricsSource", d["metrics_source"]),
        prometheus_url=raw.get("prometheusUrl"),
        scale_to_zero_after_seconds=_int(raw, "scaleToZeroAfterSeconds", d["scale_to_zero_after_seconds"], 10,
                                         86400, w),
    )
    if spec.min_replicas > spec.max_replicas:
        raise SpecError("InvalidReplicaBounds",
                        f"{w}.minReplicas ({spec.min_replicas}) must be <= maxReplicas ({spec.max_replicas})")
    if spec.metrics_source not in ("pods", "prometheus"):
        raise SpecError("InvalidField", f"{w}.metricsSource must be 'pods' or 'prometheus'")
    if spec.metrics_source == "prometheus" and not spec.prometheus_url:
        raise SpecError("InvalidField", f"{w}.prometheusUrl is required when metricsSource is 'prometheus'")
    if spec.min_replicas == 0 and spec.metrics_source != "pods":
        # idleness is read from each pod's request counter, between two scrapes
        raise SpecError("InvalidField", f"{w}.minReplicas 0 (scale to zero) needs metricsSource 'pods'")
    return spec


def parse_server(raw: dict[str, Any]) -> ServerSpec:
    d, w = _defaults(ServerSpec), "spec.server"
    spec = ServerSpec(
        max_concurrent_requests=_int(raw, "maxConcurrentRequests", d["max_concurrent_requests"], 1, where=w),
        max_input_tokens=_int(raw, "maxInputTokens", None, 1, where=w),
        max_total_tokens=_int(raw, "maxTotalTokens", None, 2, where=w),
        quantize=raw.get("quantize"),
        dtype=raw.get("dtype"),
        graceful_termination_seconds=_int(raw, "gracefulTerminationSeconds", d["graceful_termination_seconds"],
                                          0, 3600, w),
        startup_timeout_seconds=_int(raw, "startupTimeoutSeconds", d["startup_timeout_seconds"], 30, 86400, w),
        extra_args=[str(a) for a in raw.get("extraArgs", [])],
        env=list(raw.get("env", [])),
    )
    if spec.quantize is not None and spec.quantize not in QUANTIZE:
        raise SpecError("InvalidField", f"{w}.quantize must be one of {', '.join(QUANTIZE)}")
    if spec.dtype is not None and spec.dtype not in DTYPES:
        raise SpecError("InvalidField", f"{w}.dtype must be one of {', '.join(DTYPES)}")
    if spec.max_input_tokens and spec.max_total_tokens and spec.max_input_tokens >= spec.max_total_tokens:
        raise SpecError("InvalidTokenLimits", f"{w}.maxInputTokens must be < maxTotalTokens")
    return spec


def parse_spec(raw: dict[str, Any], default_image: str) -> ServiceSpec:
    """Parse and validate `spec`; raises SpecError with a reason for the Degraded condition."""
    try:
        model = parse_model(raw.get("model") or {})
        adapters = parse_adapters(raw.get("adapters"), model)
    except SourceError as e:
        raise SpecError(e.reason, str(e)) from e
    ingress = raw.get("ingress") or {}
    spec = ServiceSpec(
        model=model,
        image=raw.get("image") or default_image,
        image_pull_policy=raw.get("imagePullPolicy", "IfNotPresent"),
        image_pull_secrets=[s["name"] for s in raw.get("imagePullSecrets", []) if s.get("name")],
        shards=_int(raw, "shards", 1, 0, MAX_SHARDS),
        replicas=_int(raw, "replicas", 1, 0),
        autoscaling=parse_autoscaling(raw.get("autoscaling") or {}),
        server=parse_server(raw.get("server") or {}),
        resources=dict(raw.get("resources") or {}),
        node_selector=dict(raw.get("nodeSelector") or {}),
        tolerations=list(raw.get("tolerations") or []),
        affinity=dict(raw.get("affinity") or {}),
        cache=parse_cache(raw.get("cache") or {}, raw.get("modelCache")),
        ingress=IngressSpec(
            enabled=bool(ingress.get("enabled", False)), host=ingress.get("host"),
            class_name=ingress.get("className"), path=ingress.get("path", "/"),
            tls_secret_name=(ingress.get("tls") or {}).get("secretName"),
            annotations=dict(ingress.get("annotations") or {})),
        inference_pool=parse_inference_pool((raw.get("routing") or {}).get("inferencePool") or {}),
        api_key_secret=_secret_ref(raw.get("apiKeySecretRef"), "api-key", "spec.apiKeySecretRef"),
        service_account_name=raw.get("serviceAccountName"),
        pod_annotations=dict(raw.get("podAnnotations") or {}),
        pod_labels=dict(raw.get("podLabels") or {}),
        monitoring=bool((raw.get("monitoring") or {}).get("enabled", True)),
        monitor_kind=(raw.get("monitoring") or {}).get("kind", "ServiceMonitor"),
        metrics_compat=list((raw.get("monitoring") or {}).get("compat") or []),
        adapters=adapters,
        max_loras=_int(raw, "maxLoras", None, 1),
    )
    if spec.ingress.enabled and not spec.ingress.host:
        raise SpecError("InvalidIngress", "spec.ingress.host is required when the ingress is enabled")
    if spec.cache.access_mode not in ACCESS_MODES:
        raise SpecError("InvalidField", f"spec.cache.accessMode must be one of {', '.join(ACCESS_MODES)}")
    if spec.monitor_kind not in ("ServiceMonitor", "PodMonitor"):
        raise SpecError("InvalidField", "spec.monitoring.kind must be ServiceMonitor or PodMonitor")
    if not set(spec.metrics_compat) <= {"tgi", "vllm"}:
        raise SpecError("InvalidField", "spec.monitoring.compat entries must be tgi or vllm")
    check_cache_fits_replicas(spec)
    return spec

