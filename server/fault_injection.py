"""A test-only fault hook in the engine step, off unless GENSERVE_FAULT_STEP_TOKEN is set.

`GENSERVE_FAULT_STEP_TOKEN=<token id>`: every engine step whose batch holds a request with that token
id in its prompt raises `InjectedStepFault` before the forward pass, as a bug or a device error
would. The reliability tests use it to check that such a step fails only its own requests (424, or
an SSE error event), that the server keeps serving, and that repeated failures end the process.
It is read once at engine start; production deployments never set it.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)
FAULT_TOKEN_ENV = "GENSERVE_FAULT_STEP_TOKEN"


class InjectedStepFault(RuntimeError):
    pass


def fault_token() -> int | None:
    value = os.environ.get(FAULT_TOKEN_ENV, "").strip()
    if not value:
        return None
    logger.warning("test-only fault injection is on: steps with prompt token %s fail", value)
    return int(value)


def check_step(token: int | None, scheduled) -> None:
    """Raise InjectedStepFault when a scheduled request's prompt holds the fault token."""
    if token is None:
        return
    for s in scheduled:
        if token in s.request.prompt_token_ids:
            raise InjectedStepFault(f"injected step fault (request {s.request.request_id})")
