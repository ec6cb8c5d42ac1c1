"""What the engine hands back to the API layer for each request, step by step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TopToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(slots=True)
class TokenInfo:
    id: int
    text: str  # this token's own text (TGI's `token.text`); "" while a multi-byte char is incomplete
    logprob: float
    special: bool
    top_tokens: list[TopToken] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_tokens: list[TokenInfo]
    text_delta: str  # new text safe to show: no split characters, stop strings held back and cut
    finished: bool = False
    finish_reason: str | None = None  # "length" | "eos_token" | "stop_sequence" | "aborted"
    generated_text: str | None = None  # on the last output: all text, stop sequence cut off
    matched_stop: str | None = None  # the stop sequence that ended it (TGI keeps it in its text)
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    seed: int | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # with the first token, when asked for: one per prompt token, None for the first
    prompt_logprobs: list[float | None] | None = None
    prompt_top_tokens: list[list[TopToken]] | None = None  # top_n_tokens alternatives per prompt position
