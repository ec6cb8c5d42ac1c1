"""End-to-end fixtures: a reachable cluster, the chart installed with the real Helm library, a namespace.

Configuration (environment):
  KUBECONFIG / E2E_KUBE_CONTEXT   which cluster (default: the current context)
  E2E_OPERATOR_IMAGE              operator image loaded into the cluster (default genserve-operator:dev)
  E2E_SERVER_IMAGE                server image loaded into the cluster (default genserve-server:dev)
  E2E_USE_EXISTING_RELEASE=1      do not install/uninstall the chart (you ran `helm install` yourself)
  E2E_READY_TIMEOUT               seconds to wait for the model to become Ready (default 1200)
"""

from __future__ import annotations

import os
import uuid

import pytest

from .support import CHART, OPERATOR_NAMESPACE, RELEASE, wait_for


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: needs a Kubernetes cluster with the genserve images loaded")


def _image(env: str, default: str) -> tuple[str, str]:
    repository, _, tag = os.environ.get(env, default).rpartition(":")
    return repository, tag


@pytest.fixture(scope="session")
def kube():
    """The kubernetes client configured for the cluster, or a skip that says how to get one."""
    try:
        from kubernetes import client, config
    except ImportError:
        pytest.skip("the `kubernetes` package is missing: pip install -e '.[operator,dev]'")
    try:
        config.load_kube_config(context=os.environ.get("E2E_KUBE_CONTEXT"))
        client.VersionApi().get_code(_request_timeout=5)
    except Exception as error:  # any failure means: no usable cluster here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        pytest.skip(f"no Kubernetes cluster reachable ({reason[:200]}); "
                    "create one with the commands in e2e/README.md (kind create cluster ...)")
    return client


@pytest.fixture(scope="session")
def operator_release(kube):
    """The chart installed (CRD included) and the operator Deployment available."""
    if os.environ.get("E2E_USE_EXISTING_RELEASE") == "1":
        yield None
        return
    import helm_python as helm

    op_repo, op_tag = _image("E2E_OPERATOR_IMAGE", "genserve-operator:dev")
    server_image = os.environ.get("E2E_SERVER_IMAGE", "genserve-server:dev")
    values = {
        "image": {"repository": op_repo, "tag": op_tag, "pullPolicy": "IfNotPresent"},
        "defaultServerImage": server_image,
        "crds": {"enabled": True, "keep": False},
        "operator": {"logLevel": "verbose", "env": {"GENSERVE_OPERATOR_RECONCILE_INTERVAL_SECONDS": "10"}},
    }
    cfg = helm.Config(kube_context=os.environ.get("E2E_KUBE_CONTEXT"), namespace=OPERATOR_NAMESPACE)
    cfg.install(CHART, RELEASE, values, namespace=OPERATOR_NAMESPACE, create_namespace=True,
                wait="watcher", timeout=300)
    try:
        yield cfg
    finally:
        cfg.uninstall(RELEASE, wait="watcher", timeout=300, ignore_not_found=True)
        cfg.close()


@pytest.fixture()
def namespace(kube, operator_release):
    """A fresh namespace per test, deleted afterwards."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    core = kube.CoreV1Api()
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
    # wait while the operator still runs: it removes its finalizers, or the namespace hangs in Terminating
    wait_for(lambda: not [n for n in core.list_namespace().items if n.metadata.name == name], 300, 3,
             f"namespace {name} to be deleted")
