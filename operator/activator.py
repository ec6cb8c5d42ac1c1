"""The activator: what a scaled-to-zero TextGenerationService's Service points at.

It holds each request until a server pod answers `/health` on the `<name>-direct` Service, then proxies
it there (streams included). The operator's autoscaler reads `/metrics` on the metrics port: a held
request wakes the service up (replicas 0 -> 1); once a pod is ready the operator points the Service
back at the server pods, and the activator only drains what it holds. Knative's activator, small.

    python -m genserve.operator.activator --target http://chat-direct.default.svc:80 --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

logger = logging.getLogger("genserve.activator")

# answered at once while the model is down, never held: load-balancer and kubelet probes must not wake it
PROBES = {"/", "/health", "/metrics", "/ping"}
# hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp recomputes
DROPPED_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                   "transfer-encoding", "upgrade", "host", "content-length"}


@dataclass(slots=True)
class ActivatorConfig:
    target: str  # base URL of the server pods, e.g. http://chat-direct.default.svc:80
    port: int = 8080
    metrics_port: int = 9090
    hold_timeout_seconds: float = 900.0  # a cold start: scheduling, image pull, loading weights
    max_held_requests: int = 256
    health_interval_seconds: float = 1.0


def error(status: int, message: str, error_type: str) -> web.Response:
    """TGI's error body, as every genserve route answers."""
    return web.json_response({"error": message, "error_type": error_type}, status=status)


class Activator:
    def __init__(self, config: ActivatorConfig) -> None:
        self.config = config
        self.held = 0
        self.requests_total = 0  # every request that reached the activator
        self.proxied_total = 0
        self.timed_out_total = 0
        self._ready = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        self._poller = asyncio.create_task(self._poll_health())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._session is not None:
            await self._session.close()

    async def _poll_health(self) -> None:
        """Keep `_ready` in step with the server pods' /health (set: proxy at once; clear: hold)."""
        while True:
            try:
                async with self._session.get(self.config.target + "/health",
                                             timeout=aiohttp.ClientTimeout(total=2)) as response:
                    healthy = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                healthy = False
            if healthy and not self._ready.is_set():
                logger.info("server pods are up: releasing %d held requests", self.held)
            (self._ready.set if healthy else self._ready.clear)()
            await asyncio.sleep(self.config.health_interval_seconds)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests_total += 1
        body = await request.read()
        deadline = time.monotonic() + self.config.hold_timeout_seconds
        while True:
            if not self._ready.is_set():
                if request.method in ("GET", "HEAD") and request.path in PROBES:
                    return error(503, "the model is scaled to zero; a generation request starts it", "unhealthy")
                held = await self._hold(request, deadline)
                if held is not None:
                    return held
            try:
                return await self._proxy(request, body)
            except aiohttp.ClientConnectorError:
                # the pods went away since the last health poll (just scaled to zero): hold it instead
                self._ready.clear()

    async def _hold(self, request: web.Request, deadline: float) -> web.Response | None:
        """Wait for a ready server pod; an error response when the wait cannot or did not succeed.
        The proxy app cancels this handler when the client goes away (handler_cancellation), so an
        abandoned request stops counting as held at once."""
        if self.held >= self.config.max_held_requests:
            return error(429, "Model is overloaded: too many requests wait for the model to start", "overloaded")
        self.held += 1
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._ready.wait(), max(deadline - started, 0))
        except asyncio.TimeoutError:
            self.timed_out_total += 1
            return error(503, f"the model did not start within {self.config.hold_timeout_seconds:g} s", "unhealthy")
        finally:
            self.held -= 1
        logger.info("held %s %s for %.1f s", request.method, request.path, time.monotonic() - started)
        return None

    async def _proxy(self, request: web.Request, body: bytes) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS}
        url = self.config.target + request.path_qs
        try:
            upstream = await self._session.request(request.method, url, headers=headers, data=body)
        except aiohttp.ClientConnectorError:
            raise  # nothing reached a server: the caller holds the request again
        except aiohttp.ClientError as e:
            return error(502, f"the model server did not answer: {type(e).__name__}", "unhealthy")
        self.proxied_total += 1
        async with upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in DROPPED_HEADERS})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():  # SSE frames pass as they come
                await response.write(chunk)
            await response.write_eof()
            return response

    async def metrics(self, request: web.Request) -> web.Response:
        lines = [
            "# HELP genserve_activator_requests_waiting Requests held until a server pod is ready",
            "# TYPE genserve_activator_requests_waiting gauge",
            f"genserve_activator_requests_waiting {self.held}",
            "# HELP genserve_activator_requests_total Requests that reached the activator",
            "# TYPE genserve_activator_requests_total counter",
            f"genserve_activator_requests_total {self.requests_total}",
            "# TYPE genserve_activator_proxied_total counter",
            f"genserve_activator_proxied_total {self.proxied_total}",
            "# TYPE genserve_activator_timed_out_total counter",
            f"genserve_activator_timed_out_total {self.timed_out_total}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"held": self.held, "server_ready": self._ready.is_set()})


async def serve(config: ActivatorConfig, host: str = "0.0.0.0") -> tuple[Activator, list[web.AppRunner]]:
    """Start the proxy and the metrics listener; returns the activator and the runners to clean up."""
    activator = Activator(config)
    await activator.start()
    proxy = web.Application(client_max_size=64 * 2**20)
    proxy.router.add_route("*", "/{tail:.*}", activator.handle)
    admin = web.Application()
    admin.router.add_get("/metrics", activator.metrics)
    admin.router.add_get("/healthz", activator.healthz)
    runners = []
    for app, port in ((proxy, config.port), (admin, config.metrics_port)):
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    return activator, runners


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Hold requests for a scaled-to-zero genserve service.")
    parser.add_argument("--target", required=True, help="base URL of the server pods (the <name>-direct Service)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--metrics-port", type=int, default=9090)
    parser.add_argument("--hold-timeout-seconds", type=float, default=900.0)
    parser.add_argument("--max-held-requests", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = ActivatorConfig(target=args.target.rstrip("/"), port=args.port, metrics_port=args.metrics_port,
                             hold_timeout_seconds=args.hold_timeout_seconds, max_held_requests=args.max_held_requests)
    logger.info(json.dumps({"activator": "starting", "target": config.target, "port": config.port}))

    async def run() -> None:
        activator, runners = await serve(config)
        try:
            await asyncio.Event().wait()
        finally:
            await activator.close()
            for runner in runners:
                await runner.cleanup()

    asyncio.run(run())


if __name__ == "__main__":
    main()
