"""What one benchmark run does: the endpoint, the workload and the load levels."""

from __future__ import annotations

from dataclasses import dataclass, field

API_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "tgi": "/generate_stream"}


@dataclass(slots=True)
class WorkloadConfig:
    input_tokens: int = 128
    output_tokens: int = 128
    dataset: str | None = None
    tokenizer: str | None = None
    seed: int = 0


@dataclass(slots=True)
class RequestConfig:
    api: str = "completions"
    model: str | None = None
    ignore_eos: bool = True
    request_usage: bool = True
    temperature: float = 0.0
    extra_body: dict = field(default_factory=dict)
    request_timeout: float = 300.0

    def __post_init__(self):
        if self.api not in API_PATHS:
            raise ValueError(f"api must be one of {', '.join(API_PATHS)}, not {self.api!r}")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")


@dataclass(slots=True)
class LoadConfig:
    concurrency: list[int] = field(default_factory=list)
    request_rates: list[float] = field(default_factory=list)
    num_prompts: int = 0  # 0: 4 x concurrency (closed loop) or 20 s of arrivals (open loop), at least 8
    warmup: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if any(c < 1 for c in self.concurrency):
            raise ValueError("concurrency levels must be >= 1")
        if any(r <= 0 for r in self.request_rates):
            raise ValueError("request rates must be > 0")
        if self.num_prompts < 0 or self.warmup < 0:
            raise ValueError("num_prompts and warmup must be >= 0")

    def prompts_for(self, mode: str, value: float) -> int:
        if self.num_prompts:
            return self.num_prompts
        return max(8, int(4 * value) if mode == "concurrency" else int(20 * value))


@dataclass(slots=True)
class BenchmarkConfig:
    url: str
    label: str = "genserve"
    wait_ready: float = 0.0
    slo_ttft: float | None = None
    slo_itl: float | None = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    request: RequestConfig = field(default_factory=RequestConfig)
    load: LoadConfig = field(default_factory=LoadConfig)

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, not {self.url!r}")
        if not self.load.concurrency and not self.load.request_rates:
            self.load.concurrency = [1]


class BenchmarkError(Exception):
    """A problem that ends the run with a one-line message (an unreachable endpoint, a bad flag)."""
