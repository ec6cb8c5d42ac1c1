"""Conditions, the status writer and drift detection, with a recording fake in place of the API."""

from __future__ import annotations

from genserve.operator import status
from genserve.operator.controller import is_drifted


class FakeKube:
    def __init__(self, body):
        self.body, self.patches = body, []

    def get(self, kind, namespace, name):
        return self.body

    def merge_patch(self, kind, namespace, name, patch, subresource=None):
        self.patches.append((subresource, patch))
        self.body = {**self.body, "status": {**self.body.get("status", {}), **patch["status"]}}
        return self.body["status"]


def test_transition_time_moves_only_when_the_status_flips():
    first = status.set_condition([], "Ready", False, "NoReplicasReady", "0/1")
    again = status.set_condition(first, "Ready", False, "NoReplicasReady", "0/1 still")
    assert again[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] and again[0]["message"] == "0/1 still"
    flipped = status.set_condition([{**first[0], "lastTransitionTime": "2000-01-01T00:00:00Z"}], "Ready", True,
                                   "ReplicasReady", "1/1")
    assert flipped[0]["status"] == "True" and flipped[0]["lastTransitionTime"] != "2000-01-01T00:00:00Z"


def test_conditions_keep_a_stable_order():
    conditions = []
    for type_ in ("ScalingActive", "Degraded", "Ready", "Progressing"):
        conditions = status.set_condition(conditions, type_, True, "R", "m")
    assert [c["type"] for c in conditions] == ["Ready", "Progressing", "Degraded", "ScalingActive"]


def test_write_status_merges_and_skips_unchanged_writes():
    kube = FakeKube({"metadata": {"generation": 3}, "status": {"replicas": 1}})
    status.write_status(kube, "ns", "a", {"readyReplicas": 1}, {"Ready": (True, "ReplicasReady", "1/1")})
    assert len(kube.patches) == 1
    written = kube.patches[0][1]["status"]
    assert kube.patches[0][0] == "status" and written["readyReplicas"] == 1
    assert written["conditions"][0]["observedGeneration"] == 3
    status.write_status(kube, "ns", "a", {"readyReplicas": 1}, {"Ready": (True, "ReplicasReady", "1/1")})
    assert len(kube.patches) == 1  # the same content is no write


def test_deployment_status_to_conditions():
    fields, conditions = status.deployment_status(
        {"status": {"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3}}, desired=3)
    assert fields == {"replicas": 3, "readyReplicas": 2}
    assert conditions["Ready"][0] is True and conditions["Progressing"][:2] == (True, "RollingOut")
    _, stalled = status.deployment_status({"status": {"readyReplicas": 0, "conditions": [
        {"type": "Progressing", "reason": "ProgressDeadlineExceeded"}]}}, desired=1)
    assert stalled["Progressing"][:2] == (False, "ProgressDeadlineExceeded") and stalled["Ready"][0] is False
    _, missing = status.deployment_status(None, desired=1)
    assert missing["Ready"][1] == "DeploymentMissing"


def test_drift_ignores_fields_the_server_adds_but_not_ours():
    desired = {"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "s", "args": ["a"]}]}}}}
    actual = {"spec": {"replicas": 2, "revisionHistoryLimit": 10, "template": {"spec": {
        "dnsPolicy": "ClusterFirst", "containers": [{"name": "s", "args": ["a"], "terminationMessagePath": "x"}]}}}}
    assert not is_drifted(actual, desired)
    actual["spec"]["template"]["spec"]["containers"][0]["args"] = ["b"]
    assert is_drifted(actual, desired)
    assert not is_drifted({"limits": {"cpu": "16"}}, {"limits": {"cpu": 16}})  # quantities come back as strings
    assert is_drifted({"spec": {}}, {"spec": {"replicas": 1}})
