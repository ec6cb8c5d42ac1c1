"""Incremental detokenization with stop strings, one instance per request."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# the last few prompt tokens give the first generated token its spacing (vLLM uses 5 too)
NUM_PROMPT_CONTEXT_TOKENS = 5

_SPECIALS_CACHE: dict[int, tuple[object, dict[int, str]]] = {}


@dataclass(slots=True)
class DetokenizerStep:
    token_text: str  # this token's own text (TGI `token.text`); "" while a multi-byte char is incomplete
    text_delta: str  # new text safe to show: whole characters, possible stop-string starts held back
    matched_stop: str | None = None


def special_token_texts(tokenizer) -> dict[int, str]:
    """{id: text} of the tokenizer's special tokens, computed once per tokenizer."""
    cached = _SPECIALS_CACHE.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    if hasattr(tokenizer, "added_tokens_decoder"):
        added = tokenizer.added_tokens_decoder
    else:
        added = tokenizer.get_added_tokens_decoder()
    specials = {i: t.content for i, t in added.items() if t.special}
    for i in getattr(tokenizer, "all_special_ids", ()):
        specials.setdefault(i, tokenizer.convert_ids_to_tokens(i))
    _SPECIALS_CACHE[id(tokenizer)] = (tokenizer, specials)
    return specials


def _rust_tokenizer(tokenizer) -> Tokenizer | None:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


class _RustStream:
    """tokenizers' own DecodeStream: holds back incomplete UTF-8 and keeps a short context."""

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int], skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=context_ids or None, skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str | None:
        return self._stream.step(self._tokenizer, token_id)


class _OffsetStream:
    """The prefix_offset/read_offset method (vLLM/TGI `decode_token`) for tokenizers without a Rust backend."""

    def __init__(self, decode: Callable[[list[int]], str], ids: list[int], read_offset: int | None = None):
        self._decode = decode
        self._ids = list(ids)
        self._read_offset = len(self._ids) if read_offset is None else read_offset
        self._prefix_offset = max(0, self._read_offset - NUM_PROMPT_CONTEXT_TOKENS)

    def step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix) :]
        return None


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas that never split a character or leak a stop string."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.matched_stop: str | None = None
        self._special_texts = special_token_texts(tokenizer)
        self._emitted: list[str] = []
        self._pending = ""  # decoded text held back because it may start a stop string

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

        self._decode = decode
        context = list(prompt_token_ids[-NUM_PROMPT_CONTEXT_TOKENS:])
        # a context ending inside a character would make the stream re-emit the prompt
        if context and decode(context).endswith("\ufffd"):
            context = []
        self._ids = context  # context + generated, only needed to recover from a stream error
        self._num_shown_ids = len(context)  # ids whose text the stream has already returned
        rust = _rust_tokenizer(tokenizer)
        if rust is not None:
            self._stream = _RustStream(rust, context, skip_special_tokens)
        else:
            self._stream = _OffsetStream(decode, context)

    @property
    def output_text(self) -> str:
        """All generated text so far, the stop string and anything after it cut off."""
        return "".join(self._emitted) + self._pending

    def add_token(self, token_id: int) -> DetokenizerStep:
        if self.matched_stop is not None:
            return DetokenizerStep("", "")
        chunk = self._step(token_id) or ""
        token_text = chunk or self._special_texts.get(token_id, "")
        if not chunk:
            return DetokenizerStep(token_text, "")
        if not self.stop:
            self._emitted.append(chunk)
            return DetokenizerStep(token_text, chunk)
        # a stop match can't begin in text already shown: that part was never a stop prefix
        text = self._pending + chunk
        match = min(((text.find(s), i) for i, s in enumerate(self.stop) if s in text), default=None)
        if match is not None:
            position, index = match
            self.matched_stop = self.stop[index]
            return self._release(text, position, token_text, self.matched_stop)
        return self._release(text, len(text) - self._num_held_back(text), token_text, None)

    def flush(self) -> str:
        """Release held-back text when the request ends without a stop match."""
        text, self._pending = self._pending, ""
        self._emitted.append(text)
        return text

    def _release(self, text: str, end: int, token_text: str, matched_stop: str | None) -> DetokenizerStep:
        self._emitted.append(text[:end])
        self._pending = "" if matched_stop else text[end:]
        return DetokenizerStep(token_text, text[:end], matched_stop)

    def _num_held_back(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of some stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        try:
            chunk = self._stream.step(token_id)
        except Exception:
            # DecodeStream refuses when a new token rewrites earlier text; go on the slow way
            self._stream = _OffsetStream(self._decode, self._ids[:-1], self._num_shown_ids)
            chunk = self._stream.step(token_id)
        if chunk is not None:
            self._num_shown_ids = len(self._ids)
        return chunk
