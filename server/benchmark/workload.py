"""The prompts: synthetic ones of an exact token length, or a JSONL dataset."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from genserve.server.benchmark.config import WorkloadConfig

_WORD = re.compile(r"^ [a-z]{3,12}$")


@dataclass(slots=True)
class Prompt:
    text: str | None = None
    messages: list[dict] | None = None
    output_tokens: int = 128
    input_tokens: int | None = None  # by the benchmark's tokenizer, when it made the prompt


def load_tokenizer(name: str | None):
    """A Hugging Face tokenizer; default: the folder `genserve serve` uses for its built-in model."""
    from genserve.server.model_files import default_model_dir

    path = name or str(default_model_dir())
    if name is None and not Path(path).is_dir():
        raise ValueError(f"no tokenizer at {path}: pass --tokenizer (a folder or Hub id) "
                         "or run `genserve prepare-default-model`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class SyntheticPrompts:
    """Prompts of random lowercase words, each word one token, so a prompt is exactly `input_tokens` long."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.words = self._single_token_words()
        if len(self.words) < 100:
            raise ValueError("the tokenizer has too few single-token words for synthetic prompts; use --dataset")

    def _single_token_words(self) -> list[str]:
        tok = self.tokenizer
        size = min(len(tok), 32000)
        texts = tok.batch_decode([[i] for i in range(size)])
        words = [t for t in texts if _WORD.match(t)]
        return [w for w in dict.fromkeys(words) if len(tok.encode(w, add_special_tokens=False)) == 1]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def make(self, input_tokens: int, output_tokens: int) -> Prompt:
        if input_tokens < 1:
            raise ValueError("input_tokens must be >= 1")
        words = self.rng.choices(self.words, k=input_tokens)
        for _ in range(16):
            num = self.count("".join(words))
            if num == input_tokens:
                break
            if num > input_tokens:
                words.pop()
            else:
                words.append(self.rng.choice(self.words))
        text = "".join(words)
        if self.count(text) != input_tokens:  # a tokenizer that merges across words: cut at the token level
            text = self.tokenizer.decode(self.tokenizer.encode(text, add_special_tokens=False)[:input_tokens])
        return Prompt(text=text, output_tokens=output_tokens, input_tokens=self.count(text))


def load_dataset(path: str | Path, default_output_tokens: int) -> list[Prompt]:
    """JSONL, one object a line: {"prompt": str} or {"messages": [...]}, optional "output_tokens"."""
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            raise ValueError(f'{path}:{n}: expected an object with "prompt" (a string) or "messages" (a list)')
        output_tokens = int(row.get("output_tokens", default_output_tokens))
        if output_tokens < 1:
            raise ValueError(f"{path}:{n}: output_tokens must be >= 1")
        prompts.append(Prompt(text=row.get("prompt"), messages=row.get("messages"), output_tokens=output_tokens))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class Workload:
    """Hands out prompts: a fresh synthetic one each time, or the dataset's in a cycle."""

    def __init__(self, config: WorkloadConfig, tokenizer=None):
        self.config = config
        self.dataset = load_dataset(config.dataset, config.output_tokens) if config.dataset else None
        self.synthetic = None
        if self.dataset is None:
            self.synthetic = SyntheticPrompts(tokenizer or load_tokenizer(config.tokenizer), config.seed)
        self.next_index = 0

    def take(self, n: int) -> list[Prompt]:
        if self.synthetic is not None:
            return [self.synthetic.make(self.config.input_tokens, self.config.output_tokens) for _ in range(n)]
        out = self.peek(n)
        self.next_index += n
        return out

    def peek(self, n: int) -> list[Prompt]:
        """The next prompts without moving on (warm-up requests)."""
        if self.synthetic is not None:
            return self.take(n)
        return [self.dataset[(self.next_index + i) % len(self.dataset)] for i in range(n)]
