"""kopf entry point: `kopf run -m genserve.operator.main`. Decorators only; the work is in controller.py."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from genserve.operator import controller
from genserve.operator.autoscaler import ScalerState
from genserve.operator.autoscaler_metrics import AutoscalerMetrics
from genserve.operator.kube import Kube, load_api_client
from genserve.operator.restore_retry import OwnerRetries, describe, restore_owner
from genserve.operator.settings import GROUP, MANAGED_BY, PLURAL, SERVICE_LABEL, VERSION, OperatorSettings

TGS = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
def operator_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    config = OperatorSettings.from_env()
    memo.ctx = controller.Context(kube=Kube(load_api_client()), settings=config)
    memo.restores = OwnerRetries(lambda namespace, name: restore_owner(memo.ctx, namespace, name))
    _register_resync(config.reconcile_interval_seconds)
    memo.autoscaler_metrics = AutoscalerMetrics()
    if config.metrics_port:
        memo.autoscaler_metrics.serve(config.metrics_port)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    # only our explicit kopf.event() calls become Events, not every log line
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 32
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    if config.peering:
        settings.peering.name = config.peering
        settings.peering.standalone = False
    logger.info(f"genserve operator started: {config}")


@kopf.on.cleanup()
def operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.restores.stop()


@kopf.on.login()
def operator_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # kopf's own readers need no client library and read $KUBECONFIG when called
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.create(*TGS)
@kopf.on.update(*TGS)
@kopf.on.resume(*TGS)
def tgs_reconcile(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, retry: int, **_: Any) -> None:
    try:
        controller.reconcile_service(memo.ctx, dict(body), logger)
    except Exception as e:
        if not controller.is_transient(e):
            raise
        # level-based: the next pass redoes everything, soon (kopf's default backoff is 60 s)
        delay = controller.retry_delay(retry)
        raise kopf.TemporaryError(f"{type(e).__name__}: {e}; retrying in {delay:g} s", delay=delay) from e


def tgs_resync(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    controller.reconcile_service(memo.ctx, dict(body), logger, is_resync=True)


_resync_interval: list[float] = []  # registered once per process (kopf's default registry is global)


def _register_resync(seconds: float) -> None:
    # a timer's interval is fixed when it is registered, and the settings are read at startup (never at
    # import): so the timer is registered here, before kopf starts watching
    if not _resync_interval:
        _resync_interval.append(seconds)
        kopf.timer(*TGS, interval=seconds, initial_delay=seconds)(tgs_resync)


@kopf.daemon(*TGS, cancellation_timeout=5)
def tgs_autoscale(stopped: kopf.DaemonStopped, body: kopf.Body, spec: kopf.Spec, memo: kopf.Memo,
                  logger: logging.Logger, **_: Any) -> None:
    state = ScalerState()
    meta = body["metadata"]
    while not stopped:
        try:
            decision = controller.autoscale_tick(memo.ctx, dict(body), state, logger)
            memo.autoscaler_metrics.observe(dict(body), decision, memo.ctx.settings.default_image)
        except Exception as e:  # a failed tick must not end the loop; the next one retries
            logger.warning(f"autoscaler tick failed: {type(e).__name__}: {e}")
        interval = (spec.get("autoscaling") or {}).get("intervalSeconds")
        stopped.wait(interval if isinstance(interval, int) and interval >= 1 else 15)
    memo.autoscaler_metrics.forget(meta["namespace"], meta["name"])


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY)
@kopf.on.event("batch", "v1", "jobs", labels=MANAGED_BY)
@kopf.on.event("", "v1", "services", labels=MANAGED_BY)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED_BY)
@kopf.on.event("networking.k8s.io", "v1", "ingresses", labels=MANAGED_BY)
def child_event(type: str, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    if type not in ("MODIFIED", "DELETED"):
        return
    try:
        controller.on_child_event(memo.ctx, type, dict(body), logger)
    except Exception as e:
        owner = (body["metadata"].get("labels") or {}).get(SERVICE_LABEL)
        if not controller.is_transient(e) or not owner:
            raise
        # kopf never retries an event handler: the owner's whole pass is retried with the reconcile's backoff
        started = memo.restores.request(body["metadata"]["namespace"], owner)
        logger.info(f"restoring {body['kind']} {body['metadata']['name']} failed ({describe(e)}); "
                    + ("retrying with backoff" if started else "its owner's retry is already pending"))

