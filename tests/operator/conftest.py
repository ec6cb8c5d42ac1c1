"""One emulated API server and one real operator (kopf via KopfRunner) for the whole session; each test
works in its own namespace, so tests stay independent while the ~1 s start-up is paid once."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from harness import OPERATOR_TOKEN, ClusterThread, call_scopes, recorded_calls, wait_for
from kopf.testing import KopfRunner
from kubernetes import client
from operator_api_calls import CALLS, CLUSTER_PEERING_CALLS

ROOT = Path(__file__).resolve().parents[2]
TGS = ("genserve.dev", "v1alpha1", "textgenerationservices")


@pytest.fixture(scope="session", autouse=True)
def api_call_recorder() -> Iterator[None]:
    """Least privilege, checked at the end of the session: every API call the operator made to any emulator
    (told from the tests' own by its token) must be in operator_api_calls, the list the chart's RBAC is
    tested to grant exactly (test_operator_rbac.py). Fails the session's last teardown otherwise."""
    yield
    unlisted = call_scopes(recorded_calls()) - (CALLS | CLUSTER_PEERING_CALLS)
    assert not unlisted, f"the operator made API calls that operator_api_calls.py does not list: {sorted(unlisted)}"


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterThread]:
    with ClusterThread() as ct:
        yield ct


@pytest.fixture(scope="session")
def api(cluster: ClusterThread) -> client.ApiClient:
    return client.ApiClient(client.Configuration(host=cluster.url))


@pytest.fixture(scope="session")
def kubeconfig(cluster: ClusterThread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}],
        "users": [{"name": "operator", "user": {"token": OPERATOR_TOKEN}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "operator"}}],
    }))
    return path


@pytest.fixture(scope="session")
def operator(cluster: ClusterThread, kubeconfig: Path) -> Iterator[KopfRunner]:
    """The real operator, configured the way the Helm chart runs it: kubeconfig login, all namespaces."""
    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    args = ["run", "--standalone", "--all-namespaces", "-m", "genserve.operator.main"]
    try:
        with KopfRunner(args, timeout=30) as runner:
            # ready once it watches our resource
            wait_for(lambda: any("textgenerationservices" in str(r.url) and r.params.get("watch") == "true"
                                 for r in list(cluster.cluster._requests)), what="the operator's watch")
            yield runner
    finally:
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved
    assert runner.exception is None or isinstance(runner.exception, SystemExit), runner.output


@pytest.fixture()
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    yield name
    if "operator" in request.fixturenames:
        # stop this test's daemons so they do not load the tests that follow
        api = request.getfixturevalue("api")
        objects = client.CustomObjectsApi(api)
        group, version, plural = TGS
        for item in objects.list_namespaced_custom_object(group, version, name, plural)["items"]:
            objects.delete_namespaced_custom_object(group, version, name, plural, item["metadata"]["name"])


@pytest.fixture()
def crds() -> dict:
    return yaml.safe_load((ROOT / "crds" / "textgenerationservices.yaml").read_text())

