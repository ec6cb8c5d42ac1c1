"""Constrained decoding: JSON schemas and regular expressions, enforced token by token with llguidance.

A request's grammar becomes one `llguidance.LLMatcher`. Before each sampling step the matcher says
which tokens may come next (a bitmask over the vocabulary); the sampler sets every other logit to
-inf; after the step the matcher consumes the chosen token. When the grammar is complete (the JSON
value is closed, the regex cannot be extended) the request finishes with `eos_token`.

llguidance (Microsoft's Rust engine, also used by vLLM, SGLang and llama.cpp) builds masks in tens
of microseconds and handles tokens that span several grammar symbols; we keep only the glue here.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

GRAMMAR_KINDS = ("json", "regex")
# One fixed layout, `{"a": 1, "b": [2, 3]}`, as TGI (outlines) and OpenAI produce: with free whitespace
# small models wander into runs of newlines and spaces that eat the token budget. A schema may still
# override it through llguidance's `x-guidance` key.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# compiled grammars are reused across requests that send the same schema (tool-heavy clients do)
CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What a request asks for: `json` (a JSON schema, as JSON text) or `regex` (a pattern)."""

    kind: str
    value: str

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        """A schema given as a dict or as JSON text; raises ValueError for anything else."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"grammar is not valid: the JSON schema is not JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ValueError("grammar is not valid: a JSON schema must be an object")
        return cls("json", json.dumps(schema))  # key order kept: properties come out in schema order

    @classmethod
    def regex(cls, pattern: Any) -> GrammarSpec:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("grammar is not valid: a regex grammar needs a non-empty string value")
        return cls("regex", pattern)


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.num_words = (vocab_size + 31) // 32  # int32 words in one row of the bitmask

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 words, bit i of word w = token 32w+i)."""
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False when the grammar rejects it (the matcher is then dead)."""
        return self._matcher.consume_token(token_id)

    @property
    def is_finished(self) -> bool:
        """The grammar allows nothing more than end-of-sequence."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer; thread-safe (validation runs off the step thread)."""

    def __init__(self, tokenizer) -> None:
        self._hf_tokenizer = tokenizer
        self._ll_tokenizer = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, str] = OrderedDict()

    @staticmethod
    def available() -> bool:
        try:
            import llguidance  # noqa: F401
        except ImportError:
            return False
        return True

    def _tokenizer(self):
        # building llguidance's view of the vocabulary and its first mask takes ~1.5 s: once, lazily
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance
                import llguidance.hf

                tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
                warm = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_regex("a"))
                mask = torch.empty(1, (tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
                GrammarMatcher(warm, tokenizer.vocab_size).fill_bitmask(mask, 0)
                self._ll_tokenizer = tokenizer
            return self._ll_tokenizer

    def warm_up(self) -> None:
        self._tokenizer()

    def compile(self, spec: GrammarSpec) -> str:
        """The llguidance grammar for `spec`; raises ValueError (TGI's wording) when it is invalid."""
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        from llguidance import LLMatcher

        if spec.kind == "json":
            try:
                grammar = LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_LAYOUT)
            except ValueError as e:
                raise ValueError(f"grammar is not valid: {e}") from None
        elif spec.kind == "regex":
            from llguidance import regex_to_lark

            # \d, \w and \s mean ASCII, as in TGI (outlines): Rust's Unicode \d lets in digits from any script
            grammar = LLMatcher.grammar_from_regex(regex_to_lark(spec.value, "dws"))
        else:
            raise ValueError(f"grammar is not valid: unknown type `{spec.kind}`; use one of {list(GRAMMAR_KINDS)}")
        error = LLMatcher.validate_grammar(grammar, self._tokenizer())
        if error:
            raise ValueError(f"grammar is not valid: {_one_line(error)}")
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        from llguidance import LLMatcher

        tokenizer = self._tokenizer()
        matcher = LLMatcher(tokenizer, self.compile(spec), log_level=0)
        if matcher.is_error():  # validated above, so only a resource limit can land here
            raise ValueError(f"grammar is not valid: {_one_line(matcher.get_error())}")
        return GrammarMatcher(matcher, tokenizer.vocab_size)


def _one_line(message: str) -> str:
    """llguidance's multi-line diagnostics on one line, keeping the cause (it often comes last)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines)[:500] if lines else message


_executor = None


def fill_bitmasks(matchers: list[GrammarMatcher], bitmask: torch.Tensor) -> None:
    """Row j of `bitmask` for matchers[j], computed on llguidance's own threads (the GIL is released)."""
    global _executor
    if len(matchers) == 1:
        matchers[0].fill_bitmask(bitmask, 0)
        return
    from llguidance import LLExecutor

    if _executor is None:
        _executor = LLExecutor(num_threads=max(1, torch.get_num_threads()))
    _executor.unsafe_compute_mask_ptr([(m._matcher, j) for j, m in enumerate(matchers)], bitmask.data_ptr(),
                                      bitmask.shape[1] * bitmask.element_size(), bitmask.shape[0])


def allowed_token_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [N, ceil(V'/32)] -> bool [N, vocab_size]; ids beyond the tokenizer's are never allowed."""
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.view(bitmask.shape[0], -1).bool()
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros(bitmask.shape[0], vocab_size - allowed.shape[1], dtype=torch.bool)
    return torch.cat([allowed, pad], dim=1)
