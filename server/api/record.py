"""What the pipeline keeps about a request: its record (timings, counts, outcome), the jobs it admitted,
and the sequences it got back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from genserve.server.outputs import TokenInfo, TopToken
from genserve.server.sampling_params import SamplingParams

SEED_MODULUS = 2**64


@dataclass
class RequestRecord:
    """Timings and counts of one HTTP request: headers, metrics, the JSON log line and (later) trace
    spans all come from it. The instants are time.perf_counter()'s:

        start -> validated (admitted) -> +queue_s (first scheduled) -> first_token -> end
    """

    request_id: str
    route: str
    start: float = field(default_factory=time.perf_counter)
    validated: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    end: float | None = None
    queue_s: float = 0.0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    max_new_tokens: int = 0
    finish_reason: str | None = None
    status: int = 200
    error: str | None = None
    done: bool = False
    request_headers: dict[str, str] = field(default_factory=dict)  # a caller's `traceparent` / `tracestate`

    def mark_validated(self) -> None:
        if self.validated is None:
            self.validated = time.perf_counter()

    def timings(self) -> dict[str, float]:
        end = self.end or time.perf_counter()
        validated = self.validated or end
        total = end - self.start
        validation = validated - self.start
        queue = min(self.queue_s, max(end - validated, 0.0))
        inference = max(end - validated - queue, 0.0)
        per_token = inference / self.num_generated_tokens if self.num_generated_tokens else 0.0
        return {"total": total, "validation": validation, "queue": queue, "inference": inference,
                "time_per_token": per_token}

    def headers(self, compute_type: str) -> dict[str, str]:
        t = self.timings()
        ms = {k: str(int(v * 1000)) for k, v in t.items()}
        return {
            "x-compute-type": compute_type,
            "x-total-time": ms["total"],
            "x-validation-time": ms["validation"],
            "x-queue-time": ms["queue"],
            "x-inference-time": ms["inference"],
            "x-time-per-token": ms["time_per_token"],
            "x-prompt-tokens": str(self.num_prompt_tokens),
            "x-generated-tokens": str(self.num_generated_tokens),
            "x-request-id": self.request_id,
        }


@dataclass(slots=True)
class Job:
    """One sequence a route asks for: its prompt and parameters (a request may hold several: `n`,
    `best_of`, prompt lists)."""

    prompt_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class AdmittedJob:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int


@dataclass(slots=True)
class AdmittedRequest:
    """A request that passed admission: limits checked, grammar compiled, each job's max_new_tokens
    resolved. Only this reaches the engine (`GenerationService.run` / `.stream`)."""

    record: RequestRecord
    jobs: list[AdmittedJob]
    count_best_only: bool = False  # TGI's best_of: the answer is one of the sequences

    @property
    def num_prompt_tokens(self) -> int:
        return self.record.num_prompt_tokens


@dataclass(slots=True)
class SequenceResult:
    """One finished sequence, as the engine reported it."""

    tokens: list[TokenInfo]
    text: str  # stop sequence cut off
    finish_reason: str
    matched_stop: str | None
    num_prompt_tokens: int
    num_generated_tokens: int
    seed: int | None
    queue_s: float = 0.0
    prompt_logprobs: list[float | None] | None = None  # when the params asked for them
    prompt_top_tokens: list[list[TopToken]] | None = None

    @property
    def mean_logprob(self) -> float:
        return sum(t.logprob for t in self.tokens) / len(self.tokens) if self.tokens else float("-inf")


def best_sequence(results: list[SequenceResult]) -> SequenceResult:
    """TGI's best_of: the sequence with the highest mean log-probability."""
    return max(results, key=lambda s: s.mean_logprob) if len(results) > 1 else results[0]


def derive_seeds(seed: int | None, n: int) -> list[int | None]:
    if seed is None:
        return [None] * n
    return [(seed + i) % SEED_MODULUS for i in range(n)]
