"""Every stop rule, from server/stopping.py (no model: requests and a stand-in grammar matcher)."""

from dataclasses import dataclass

import pytest

from genserve.server.request import Request, RequestStatus
from genserve.server.sampling_params import SamplingParams
from genserve.server.stopping import grammar_stop, holds_back_stops, text_stop, token_stop

EOS = 2


def req(max_new=5, **params) -> Request:
    return Request("r", [10, 11], SamplingParams(**params), max_new_tokens=max_new, eos_token_ids=frozenset({EOS}))


def appended(request: Request, *tokens: int) -> Request:
    for t in tokens:
        request.append_output_token(t)
    return request


@pytest.mark.parametrize("params, tokens, expected", [
    ({}, [5, EOS], (RequestStatus.FINISHED_STOPPED, "eos_token")),
    ({"ignore_eos": True}, [5, EOS], None),
    ({"stop_token_ids": [7]}, [5, 7], (RequestStatus.FINISHED_STOPPED, "eos_token")),
    ({}, [5, 6], None),
    ({}, [5, 6, 7, 8, 9], (RequestStatus.FINISHED_LENGTH, "length")),
    ({"ignore_eos": True}, [5, 6, 7, 8, EOS], (RequestStatus.FINISHED_LENGTH, "length")),
])
def test_token_rules(params, tokens, expected):
    request = appended(req(**params), *tokens)
    assert token_stop(request, tokens[-1]) == expected


def test_text_rule():
    assert text_stop(None) is None
    assert text_stop("\n\n") == (RequestStatus.FINISHED_STOPPED, "stop_sequence")


@dataclass
class Matcher:
    allowed: set[int]
    done_after: int | None = None
    is_finished: bool = False
    error: str = ""

    def accept(self, token_id: int) -> bool:
        if token_id not in self.allowed:
            return False
        self.is_finished = token_id == self.done_after
        return True


def test_grammar_rules():
    assert grammar_stop(Matcher({1, 2}), 1) == (None, False)
    assert grammar_stop(Matcher({1, 2}, done_after=2), 2) == ((RequestStatus.FINISHED_STOPPED, "eos_token"), False)
    assert grammar_stop(Matcher({1}), 9) == ((RequestStatus.FINISHED_STOPPED, "eos_token"), True)


def test_min_tokens_hold_back():
    params = SamplingParams(min_tokens=2)
    assert holds_back_stops(0, params) and holds_back_stops(1, params) and not holds_back_stops(2, params)
    assert not holds_back_stops(0, SamplingParams())
