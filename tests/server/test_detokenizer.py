import pytest
from transformers import AutoTokenizer

from genserve.server.detokenizer import IncrementalDetokenizer, special_token_texts

TEXTS = [
    "Hello world",
    " leading space and  double  spaces",
    "line one\nline two\n\n\tindented\r\nwindows",
    "café naïve résumé Ångström façade",
    "日本語のテキストです。中文也可以。한국어도",
    "emoji 🤗🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "math ∑∫√∞ ≠ ≤ and arrows →⇒ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "mixed: naïve 🤗 日本\n  code = {'a': [1, 2]}  # ok",
    "   ",
    "a" * 50 + " ÿ€ ¢ ~ ` ^",
]


class SlowTokenizer:
    """The transformers tokenizer without its Rust backend, to exercise the fallback path."""

    def __init__(self, tokenizer):
        self._inner = tokenizer
        self.added_tokens_decoder = tokenizer.added_tokens_decoder

    def decode(self, ids, skip_special_tokens=True):
        return self._inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def stream(detok, ids):
    return [detok.add_token(t) for t in ids]


@pytest.mark.parametrize("slow", [False, True], ids=["rust", "offsets"])
@pytest.mark.parametrize("prompt", ["", "User: say something", "<|im_start|>assistant\n"])
def test_round_trip_token_by_token(tokenizer, slow, prompt):
    tok = SlowTokenizer(tokenizer) if slow else tokenizer
    prompt_ids = encode(tokenizer, prompt)
    for text in TEXTS:
        ids = encode(tokenizer, text)
        detok = IncrementalDetokenizer(tok, prompt_ids)
        steps = stream(detok, ids)
        deltas = [s.text_delta for s in steps]
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
        assert detok.output_text == text
        assert not any("\ufffd" in d for d in deltas)
        assert not any("\ufffd" in s.token_text for s in steps)
        assert "".join(s.token_text for s in steps) == text


def test_multibyte_char_split_over_tokens_waits(tokenizer):
    ids = encode(tokenizer, "🤗")
    assert len(ids) > 1
    steps = stream(IncrementalDetokenizer(tokenizer, []), ids)
    assert [s.text_delta for s in steps[:-1]] == [""] * (len(ids) - 1)
    assert steps[-1].text_delta == steps[-1].token_text == "🤗"


def test_first_token_spacing_follows_prompt(tokenizer):
    prompt_ids = encode(tokenizer, "The answer is")
    ids = encode(tokenizer, " forty two")
    steps = stream(IncrementalDetokenizer(tokenizer, prompt_ids), ids)
    assert steps[0].text_delta == " forty"
    assert "".join(s.text_delta for s in steps) == " forty two"


def test_prompt_ending_inside_a_character(tokenizer):
    ids = encode(tokenizer, "x 🤗 ok")
    prompt_ids, generated = ids[:2], ids[2:]
    deltas = [s.text_delta for s in stream(IncrementalDetokenizer(tokenizer, prompt_ids), generated)]
    # the prompt text is never re-emitted
    assert "x" not in "".join(deltas)
    assert "".join(deltas) == tokenizer.decode(generated)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tokenizer, "Hi there") + [im_end] + encode(tokenizer, " more")
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "<|im_start|>assistant\n"), skip_special_tokens=skip)
    steps = stream(detok, ids)
    assert "".join(s.text_delta for s in steps) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert steps[2].token_text == "<|im_end|>"
    assert steps[2].text_delta == ("" if skip else "<|im_end|>")
    assert special_token_texts(tokenizer)[im_end] == "<|im_end|>"


def test_stop_string_spanning_tokens(tokenizer):
    text = "The result: done. ### END of story"
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["### END"])
    steps = stream(detok, ids)
    deltas = [s.text_delta for s in steps]
    matched = [i for i, s in enumerate(steps) if s.matched_stop]
    assert len(matched) == 1 and steps[matched[0]].matched_stop == "### END"
    # more than one token makes up the stop string
    assert len(encode(tokenizer, " ### END")) > 1
    assert "".join(deltas) == "The result: done. "
    assert detok.output_text == "The result: done. "
    assert detok.matched_stop == "### END"
    # after a match nothing more comes out
    assert all(d == "" for d in deltas[matched[0] + 1 :])


def test_stop_string_inside_one_token(tokenizer):
    ids = encode(tokenizer, "I think therefore I am")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["ere"])
    deltas = [s.text_delta for s in stream(detok, ids)]
    assert "".join(deltas) == "I think th"
    assert detok.matched_stop == "ere"


def test_false_alarm_is_held_then_released(tokenizer):
    ids = encode(tokenizer, "Use ## headers, then ### more")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["###!"])
    steps = stream(detok, ids)
    deltas = [s.text_delta for s in steps]
    shown = ""
    for step, delta in zip(steps, deltas, strict=True):
        shown += delta
        # whatever is shown never ends with a possible start of the stop string
        assert not shown.endswith("#")
        assert step.matched_stop is None
    assert "".join(deltas) == "Use ## headers, then ### more"
    held = IncrementalDetokenizer(tokenizer, [], stop=["###!"])
    held_deltas = [s.text_delta for s in stream(held, encode(tokenizer, "tail ##"))]
    assert "".join(held_deltas) == "tail "
    assert held.output_text == "tail ##"
    assert held.flush() == "##"


def test_earliest_of_several_stops_wins(tokenizer):
    ids = encode(tokenizer, "alpha beta gamma delta")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["delta", "beta", "gam"])
    deltas = [s.text_delta for s in stream(detok, ids)]
    assert "".join(deltas) == "alpha "
    assert detok.matched_stop == "beta"


def test_stop_with_multibyte_chars(tokenizer):
    ids = encode(tokenizer, "voilà 🤗🚀 fin")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["🚀"])
    deltas = [s.text_delta for s in stream(detok, ids)]
    assert "".join(deltas) == "voilà 🤗"
    assert not any("\ufffd" in d for d in deltas)


def test_recovers_when_decode_stream_fails(tokenizer, monkeypatch):
    from genserve.server import detokenizer

    real_step = detokenizer._RustStream.step
    text = "naïve 🤗 streaming 日本 text that goes on"
    ids = encode(tokenizer, text)
    for fail_at in range(1, len(ids) + 1):
        calls = {"n": 0}

        def flaky_step(self, token_id, calls=calls, fail_at=fail_at):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise RuntimeError("Invalid prefix encountered")
            return real_step(self, token_id)

        monkeypatch.setattr(detokenizer._RustStream, "step", flaky_step)
        detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Q:"))
        assert "".join(s.text_delta for s in stream(detok, ids)) == text, fail_at
