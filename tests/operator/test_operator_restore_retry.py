"""A child deleted or edited by hand while its restore hits API errors: kopf never retries an event handler,
so the operator retries the owner's pass itself (operator/restore_retry.py) with the reconcile's backoff.
The operator runs as its own process with the periodic resync an hour away, so only that retry can bring
the child back; a permanent error ends the retry (Degraded) instead of looping."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml
from harness import (
    OPERATOR_TOKEN,
    ClusterThread,
    Fault,
    OperatorProcess,
    condition,
    create_tgs,
    get_tgs,
    matches,
    wait_for,
)
from kubernetes import client

from genserve.operator.restore_retry import OwnerRetries

DEPLOY, SVC = "apps/v1/deployments", "v1/services"
SPEC = {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "shards": 0, "replicas": 1}
FIRST_RETRY_SECONDS = 0.5  # controller.retry_delay: 0.5 s, doubling


@dataclass
class Disturbed:
    """A converged service whose child was deleted or edited by hand while the restore's writes fail."""
    faults: tuple[Fault, ...]
    since: int  # the first request id after the disturbance
    before: dict  # the child as it was before


def deployment_deleted(ct: ClusterThread, api, namespace: str) -> tuple[Fault, ...]:
    faults = ct.inject(Fault(matches("PATCH", "deployments", "chat", namespace), status=500, count=3))
    client.AppsV1Api(api).delete_namespaced_deployment("chat", namespace)
    return faults


def selector_edited(ct: ClusterThread, api, namespace: str) -> tuple[Fault, ...]:
    faults = ct.inject(Fault(matches("PATCH", "services", "chat", namespace), status=503, count=3,
                             reason="ServiceUnavailable"))
    client.CoreV1Api(api).patch_namespaced_service("chat", namespace, {"spec": {"selector": {"app": "other"}}})
    return faults


def deployment_deleted_then_refused(ct: ClusterThread, api, namespace: str) -> tuple[Fault, ...]:
    # transient at first, then the API refuses the object for good
    faults = ct.inject(
        Fault(matches("PATCH", "deployments", "chat", namespace), status=503, count=2, reason="ServiceUnavailable"),
        Fault(matches("PATCH", "deployments", "chat", namespace), status=422, count=10 ** 6, reason="Invalid"))
    client.AppsV1Api(api).delete_namespaced_deployment("chat", namespace)
    return faults


# one service (and namespace) per test, disturbed together so that their retries overlap in time
SCENARIOS = {"deleted": (DEPLOY, deployment_deleted), "edited": (SVC, selector_edited),
             "refused": (DEPLOY, deployment_deleted_then_refused)}


@pytest.fixture(scope="module")
def disturbed(tmp_path_factory) -> Iterator[tuple[ClusterThread, client.ApiClient, OperatorProcess, dict]]:
    """An emulator and an operator of their own (the session's in-process operator resyncs every 60 s)."""
    with ClusterThread() as ct:
        folder = tmp_path_factory.mktemp("restore")
        kubeconfig = folder / "config"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "k",
            "clusters": [{"name": "k", "cluster": {"server": ct.url}}],
            "users": [{"name": "operator", "user": {"token": OPERATOR_TOKEN}}],
            "contexts": [{"name": "k", "context": {"cluster": "k", "user": "operator"}}]}))
        operator = OperatorProcess(str(kubeconfig), ["--standalone", "--all-namespaces"], str(folder / "log"))
        with pytest.MonkeyPatch.context() as env:  # the child process copies the environment at start
            env.setenv("GENSERVE_OPERATOR_RECONCILE_INTERVAL_SECONDS", "3600")
            operator.start()
        try:
            api = client.ApiClient(client.Configuration(host=ct.url))
            for namespace in SCENARIOS:
                create_tgs(api, namespace, "chat", SPEC)
            wait_for(lambda: all(converged(api, ct, ns) for ns in SCENARIOS), what="the services")
            runs = {}
            for namespace, (resource, disturb) in SCENARIOS.items():
                before, since = ct.get(resource, namespace, "chat"), len(ct.cluster._requests)
                runs[namespace] = Disturbed(disturb(ct, api, namespace), since, before)
            yield ct, api, operator, runs
        finally:
            ct.clear_faults()
            operator.stop()


def converged(api, ct: ClusterThread, namespace: str) -> bool:
    degraded = condition(get_tgs(api, namespace, "chat"), "Degraded")
    return bool(degraded and degraded["status"] == "False" and ct.get(DEPLOY, namespace, "chat")
                and ct.get(SVC, namespace, "chat"))


def patches(ct: ClusterThread, plural: str, namespace: str, since: int) -> list:
    return [r for r in ct.operator_requests() if r.id >= since and matches("PATCH", plural, "chat", namespace)(r)]


def assert_backed_off(fault: Fault) -> None:
    gaps = [b - a for a, b in zip(fault.hits, fault.hits[1:], strict=False)]
    for i, gap in enumerate(gaps):  # lower bounds only: a busy machine may be slower, never faster
        assert gap >= FIRST_RETRY_SECONDS * 2 ** i * 0.9, gaps


def test_a_deleted_deployment_comes_back_through_api_errors(disturbed):
    ct, _, operator, runs = disturbed
    run = runs["deleted"]
    restored = wait_for(lambda: (d := ct.get(DEPLOY, "deleted", "chat")) and d["metadata"]["uid"]
                        != run.before["metadata"]["uid"] and d, what="the Deployment recreated")
    assert restored["spec"] == run.before["spec"]
    (fault,) = run.faults
    assert fault.spent
    assert_backed_off(fault)
    # the event handler's attempt and two retries failed, the third retry applied it: no storm of applies
    assert len(patches(ct, "deployments", "deleted", run.since)) <= len(fault.hits) + 2
    wait_for(lambda: "restore of deleted/chat: a pass completed" in operator.log(), what="the retry's log line")
    # the retry's pass posts its Events too (it runs in a copy of kopf's handler context)
    wait_for(lambda: [r for r in ct.operator_requests() if r.id >= run.since and r.method.value == "POST"
                      and r.namespace == "deleted" and (r.data or {}).get("message") == "created Deployment chat"],
             what="the Created Event")
    assert "Timer 'tgs_resync'" not in operator.log()  # the resync (an hour away) did not do it


def test_an_edited_service_selector_is_restored_through_api_errors(disturbed):
    ct, _, _, runs = disturbed
    run = runs["edited"]
    wait_for(lambda: ct.get(SVC, "edited", "chat")["spec"]["selector"] == run.before["spec"]["selector"],
             what="the selector restored")
    (fault,) = run.faults
    assert fault.spent
    assert_backed_off(fault)
    # the applies that failed, the one restoring it, and at most the clean-up of the stale key and a spare
    assert len(patches(ct, "services", "edited", run.since)) <= len(fault.hits) + 3


def test_a_permanent_error_ends_the_retries_as_degraded(disturbed):
    ct, api, _, runs = disturbed
    transient, invalid = runs["refused"].faults
    degraded = wait_for(lambda: (c := condition(get_tgs(api, "refused", "chat"), "Degraded"))
                        and c["status"] == "True" and c, what="Degraded")
    assert degraded["reason"] == "ApplyFailed" and "Deployment chat: 422" in degraded["message"]
    hits = len(transient.hits) + len(invalid.hits)
    time.sleep(3.0)  # a loop still retrying would show within this (its next delays are 2 s, 4 s)
    assert len(transient.hits) + len(invalid.hits) == hits == 3, (transient.hits, invalid.hits)
    assert ct.get(DEPLOY, "refused", "chat") is None  # the resync, or the next edit, tries again


# --- the retry loop on its own (any callable as the attempt) --------------------------------------

def fast(retry: int) -> float:
    return 0.01 * 2 ** retry


def transient(e: BaseException) -> bool:
    return isinstance(e, ConnectionError)


def test_one_loop_per_owner_and_a_request_during_a_pass_gets_one_more():
    running, release, calls = threading.Event(), threading.Event(), []

    def attempt(namespace: str, name: str) -> None:
        calls.append((namespace, name))
        if len(calls) == 1:
            running.set()
            assert release.wait(60)

    retries = OwnerRetries(attempt, transient, fast)
    assert retries.request("ns", "a")
    assert running.wait(60)
    assert not retries.request("ns", "a") and not retries.request("ns", "a")  # folded into one more pass
    release.set()
    wait_for(lambda: not retries.pending(), what="the loop to end")
    assert calls == [("ns", "a"), ("ns", "a")]


def test_transient_errors_back_off_and_a_permanent_one_stops():
    times, outcomes = [], [ConnectionError("dropped")] * 3 + [ValueError("invalid")]

    def attempt(namespace: str, name: str) -> None:
        times.append(time.monotonic())
        raise outcomes[len(times) - 1]

    retries = OwnerRetries(attempt, transient, fast)
    retries.request("ns", "b")
    wait_for(lambda: not retries.pending(), what="the loop to end")
    assert len(times) == 4  # three transient failures retried, the permanent one ended it
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(gap >= fast(i + 1) * 0.9 for i, gap in enumerate(gaps)), gaps


def test_stop_ends_a_waiting_loop():
    calls = []
    retries = OwnerRetries(lambda ns, name: calls.append(name), transient, lambda retry: 3600.0)
    retries.request("ns", "c")
    retries.stop()
    wait_for(lambda: not retries.pending(), what="the loop to end")
    assert calls == [] and not retries.request("ns", "c")
