"""Operator-wide settings, read once from the environment by the startup handler (never at import)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

GROUP, VERSION, PLURAL, KIND = "genserve.dev", "v1alpha1", "textgenerationservices", "TextGenerationService"
FIELD_MANAGER = "genserve-operator"
MANAGED_BY = {"app.kubernetes.io/managed-by": FIELD_MANAGER}
SERVICE_LABEL = "genserve.dev/service"


@dataclass(slots=True)
class OperatorSettings:
    default_image: str = "ghcr.io/genserve/genserve-server:0.1.0"
    # the periodic resync of every service (main._register_resync): the safety net for missed events
    reconcile_interval_seconds: float = 60.0
    scrape_timeout_seconds: float = 2.0
    cluster_domain: str = "cluster.local"
    peering: str = ""  # a KopfPeering name enables HA peering; empty runs standalone
    shm_size: str = "1Gi"
    prestop_sleep_seconds: int = 10
    # the activator of scaled-to-zero services runs from the operator's own image (the chart sets it)
    activator_image: str = "ghcr.io/genserve/genserve-operator:0.1.0"
    # the autoscaler's decisions per service on /metrics (autoscaler_metrics.py); 0 = off, the chart sets 8081
    metrics_port: int = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        """Each field can be set with GENSERVE_OPERATOR_<FIELD_NAME_UPPERCASE>."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f"GENSERVE_OPERATOR_{f.name.upper()}")
            if raw is not None:
                values[f.name] = type(f.default)(raw)
        return cls(**values)
