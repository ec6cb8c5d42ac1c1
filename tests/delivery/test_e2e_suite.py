"""The e2e suite stays out of the default run and skips cleanly, saying why, when no cluster is reachable."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .support import ROOT


def test_default_run_does_not_collect_e2e():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^testpaths = \["tests"\]$', pyproject, re.M), "pytest's testpaths must stay tests/ only"


def test_e2e_skips_without_a_cluster(tmp_path):
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing-kubeconfig")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "e2e", "-q", "-rs", "-p", "no:cacheprovider"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no Kubernetes cluster reachable" in result.stdout
    assert "e2e/README.md" in result.stdout
    assert " failed" not in result.stdout
