"""When a request ends: every stop rule, in one place (no torch).

- a sampled token (the scheduler asks as it appends each one, drafts included): EOS unless
  `ignore_eos`, a `stop_token_ids` id, or `max_new_tokens` reached;
- the text (the engine asks after detokenizing): a `stop` sequence appeared; the tokens after it
  are dropped and the sequence is cut from the text;
- a grammar: it rejected the token (cannot happen with its mask applied) or allows nothing more;
- before `min_tokens`, EOS and the stop ids cannot be sampled at all (`holds_back_stops`: the sampler
  masks them), so the first rule never fires early.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from genserve.server.request import Request, RequestStatus
from genserve.server.sampling_params import SamplingParams

if TYPE_CHECKING:
    from genserve.server.grammar import GrammarMatcher

# TGI's finish reasons
EOS_TOKEN = "eos_token"
LENGTH = "length"
STOP_SEQUENCE = "stop_sequence"

Stop = tuple[RequestStatus, str]


def token_stop(request: Request, token_id: int) -> Stop | None:
    """Whether `token_id`, just appended to the request, ends it."""
    params = request.sampling_params
    if token_id in request.eos_token_ids and not params.ignore_eos:
        return RequestStatus.FINISHED_STOPPED, EOS_TOKEN
    if token_id in params.stop_token_ids:
        return RequestStatus.FINISHED_STOPPED, EOS_TOKEN
    if request.num_output_tokens >= request.max_new_tokens:
        return RequestStatus.FINISHED_LENGTH, LENGTH
    return None


def text_stop(matched_stop: str | None) -> Stop | None:
    """A stop sequence found in the new text (the detokenizer matches them, held back across tokens)."""
    return (RequestStatus.FINISHED_STOPPED, STOP_SEQUENCE) if matched_stop is not None else None


def grammar_stop(grammar: GrammarMatcher, token_id: int) -> tuple[Stop | None, bool]:
    """Advance the grammar by `token_id`; (the stop, if it ends here; whether the grammar rejected it)."""
    if not grammar.accept(token_id):
        return (RequestStatus.FINISHED_STOPPED, EOS_TOKEN), True
    if grammar.is_finished:  # nothing but end-of-sequence is allowed: end it here
        return (RequestStatus.FINISHED_STOPPED, EOS_TOKEN), False
    return None, False


def holds_back_stops(num_output_tokens: int, params: SamplingParams) -> bool:
    """EOS and stop ids are masked until `min_tokens` tokens are out (transformers' min_new_tokens)."""
    return num_output_tokens < params.min_tokens
