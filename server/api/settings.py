"""Limits and switches of the HTTP layer (TGI launcher flags that the router owns)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version


def server_version() -> str:
    try:
        return version("genserve")
    except PackageNotFoundError:
        return "0.0.0"


@dataclass(slots=True)
class ServerSettings:
    hostname: str = "0.0.0.0"
    port: int = 8080
    max_concurrent_requests: int = 128
    max_client_batch_size: int = 4
    validation_workers: int = 2
    payload_limit: int = 2_000_000
    api_key: str | None = None
    cors_allow_origin: list[str] = field(default_factory=list)
    graceful_termination_timeout: int = 90
    metrics_compat: tuple[str, ...] = ()  # metric name sets exported beside TGI's: "vllm"
    send_timeout: float = 60.0  # seconds a response message may wait on a client that reads nothing
    request_header_timeout: float = 30.0  # seconds for a request head to arrive (slowloris)
    request_body_timeout: float = 30.0  # seconds a request body may stall between two chunks (then 408)
    json_output: bool = False
    exit_on_engine_failure: bool = False
    model_sha: str | None = None
    sha: str | None = None
    docker_label: str | None = None
