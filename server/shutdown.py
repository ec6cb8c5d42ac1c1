"""The uvicorn server genserve runs: SIGTERM drains instead of closing, and a dead engine ends the process.

On SIGTERM (what Kubernetes sends) the server keeps listening, answers 503 to health checks and new
requests (`api.draining.DrainGuard`), lets in-flight requests finish for up to
`--graceful-termination-timeout` seconds, then shuts down and exits 0. A second SIGTERM, or SIGINT,
is uvicorn's own: stop now. When the engine dies (repeated step failures, a tensor-parallel rank
lost) the server stops with exit code 1 so that Kubernetes restarts the pod.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)
ENGINE_FAILURE_EXIT_CODE = 1


class GenserveServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, graceful_timeout: float):
        super().__init__(config)
        self.drain = app.state.drain
        self.service = app.state.service
        self.graceful_timeout = graceful_timeout
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.drain.active:
            # re-raised by uvicorn once it has shut down: the process then ends the way SIGTERM asks
            self._captured_signals.append(sig)
            self.drain.begin()
            logger.info("SIGTERM: draining %d in-flight request(s) for up to %d s",
                        self.service.num_in_flight, self.graceful_timeout)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        engine = self.service.engine
        if getattr(engine, "error", None) is not None:
            logger.critical("the engine stopped (%s): exiting with code %d", type(engine.error).__name__,
                            ENGINE_FAILURE_EXIT_CODE)
            self.exit_code = ENGINE_FAILURE_EXIT_CODE
            self._captured_signals.clear()  # a pending SIGTERM must not turn this exit into a clean one
            return True
        if self.drain.active:
            if self.service.num_in_flight == 0:
                logger.info("drained: every in-flight request finished")
                return True
            if time.monotonic() - self.drain.started_at >= self.graceful_timeout:
                # uvicorn's own shutdown then cancels what is left (its timeout_graceful_shutdown is short)
                logger.warning("graceful termination timeout: cancelling %d request(s) still in flight",
                               self.service.num_in_flight)
                return True
        return False
