"""Per-request generation parameters and their validation (TGI's messages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler imports this module and must not pull in torch
    from genserve.server.grammar import GrammarSpec


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # vLLM: EOS and stop_token_ids are held back until this many tokens are out
    logprobs: bool = True
    top_n_tokens: int = 0
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # constrain the output to a JSON schema or a regex
    # log-probability of every prompt token given the ones before it (TGI decoder_input_details,
    # OpenAI echo + logprobs); such a request computes its whole prompt (no prefix-cache hits)
    prompt_logprobs: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI: added to the logits, in [-100, 100]
    min_p: float = 0.0  # vLLM/HF: drop tokens less likely than min_p x the most likely one (after top_p)
    allowed_token_ids: list[int] | None = None  # vLLM: only these may be generated
    # vLLM's bad_words, tokenized: a one-token word is never generated; a longer one's last token is
    # banned right after the output ends with the tokens before it
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    priority: int = 0  # vLLM: with --scheduling-policy priority, lower values are scheduled first
    adapter_id: str | None = None  # TGI's adapter_id / OpenAI's model: a LoRA adapter's name (None: the base)

    @property
    def is_greedy(self) -> bool:
        """TGI samples when asked to or when any warper is set; temperature 0 always means greedy."""
        if self.temperature == 0:
            return True
        has_warpers = (self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0
                       or self.min_p > 0.0)
        return not (self.do_sample or has_warpers)

    def validate(self, max_stop_sequences: int = 4, max_top_n_tokens: int = 5) -> None:
        """Raise ValueError with TGI's wording for any out-of-range value."""
        if self.temperature < 0:
            raise ValueError("`temperature` must be strictly positive")
        if self.repetition_penalty <= 0:
            raise ValueError("`repetition_penalty` must be strictly positive")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError("`presence_penalty` must be >= -2.0 and <= 2.0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("`top_p` must be > 0.0 and < 1.0")
        if not 0.0 < self.typical_p <= 1.0:
            raise ValueError("`typical_p` must be > 0.0 and < 1.0")
        if self.top_k < 0:
            raise ValueError("`top_k` must be strictly positive")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError("`max_new_tokens` must be strictly positive")
        if len(self.stop) > max_stop_sequences:
            raise ValueError(
                f"`stop` supports up to {max_stop_sequences} stop sequences. Given: {len(self.stop)}"
            )
        if not 0 <= self.top_n_tokens <= max_top_n_tokens:
            raise ValueError(
                f"`top_n_tokens` must be >= 0 and <= {max_top_n_tokens}. Given: {self.top_n_tokens}"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError("`seed` must be >= 0 and < 2**64")
        if self.min_tokens < 0 or (self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens):
            raise ValueError("`min_tokens` must be >= 0 and <= `max_new_tokens`")
        if any(not -100 <= bias <= 100 for bias in self.logit_bias.values()):
            raise ValueError("`logit_bias` values must be >= -100 and <= 100")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("`min_p` must be >= 0.0 and <= 1.0")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("`allowed_token_ids` must not be empty")
        if any(not word for word in self.bad_words_token_ids):
            raise ValueError("`bad_words` must not contain empty words")
