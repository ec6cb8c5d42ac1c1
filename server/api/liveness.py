"""`GET /live`: is the process worth keeping? Kubernetes' liveness probe, apart from readiness.

`/health` is readiness (TGI's semantics): 503 while warming up, after the engine died, and during a
SIGTERM drain, so load balancers stop sending. A liveness probe on it would have the kubelet kill a
pod whose drain outlasts the probe's failure budget. `/live` stays 200 while the engine's step loop is
alive (draining included) and turns 503 once it died or one step hangs (`AsyncEngine.is_live`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from genserve.server.api.protocol import ErrorResponse

router = APIRouter(tags=["Text Generation Inference"])
NOT_LIVE = {"error": "the engine stopped or is stuck in a step", "error_type": "liveness"}


def engine_is_live(engine) -> bool:
    is_live = getattr(engine, "is_live", None)  # an engine without a step loop of its own: its error says it
    return engine.error is None and (is_live is None or is_live())


@router.get("/live", responses={503: {"model": ErrorResponse}})
async def live(request: Request) -> Response:
    """200 while the engine loop runs, a SIGTERM drain included; 503 once it died or is wedged."""
    if engine_is_live(request.app.state.service.engine):
        return Response(status_code=200)
    return JSONResponse(NOT_LIVE, status_code=503)
