"""A request as the scheduler sees it: token ids, progress and status; no tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from genserve.server.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stopped"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "aborted"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    # prompt + generated so far; the runner feeds token_ids[num_computed_tokens:]
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None  # TGI's names: "length", "eos_token", "stop_sequence"
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # draft tokens to verify in the next decode step (speculative decoding); never in token_ids
    spec_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0  # drafts verified so far
    num_accepted_tokens: int = 0  # of those, kept
    adapter_index: int = 0  # the LoRA adapter it runs with (lora_adapters.AdapterRegistry); 0 = the base model
    long_rope: bool = False  # its KV is rotated with LongRoPE's long factors (set by the scheduler)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
