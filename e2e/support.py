"""Constants and polling shared by the e2e tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "genserve"
RELEASE = "genserve-e2e"
OPERATOR_NAMESPACE = "genserve-e2e-system"
GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"


def wait_for(predicate, timeout: float, interval: float = 2.0, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as error:  # the API may answer 404 while objects appear or vanish
            last = error
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
