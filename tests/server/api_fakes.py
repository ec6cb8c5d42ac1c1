"""A small in-process engine that implements the API's EngineClient protocol, for the API unit tests."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

from genserve.server.config import EngineConfig
from genserve.server.engine import StepStats
from genserve.server.lora_adapters import AdapterRegistry
from genserve.server.outputs import RequestOutput, TokenInfo, TopToken

SCRIPT = "Hello! I am a fake model. The answer is 42, and that is all."


@dataclass
class EngineStats:
    num_waiting: int = 0
    num_running: int = 0
    num_kv_blocks_total: int = 256
    num_kv_blocks_used: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0


def load_tokenizer():
    from transformers import AutoTokenizer

    from genserve.server.model_files import default_model_dir

    folder = default_model_dir()
    if not (Path(folder) / "tokenizer.json").is_file():
        import pytest

        pytest.skip(f"default model not prepared in {folder} (run `genserve prepare-default-model`)")
    return AutoTokenizer.from_pretrained(folder)


class FakeEngine:
    """Generates a fixed script token by token; sampling with a seed starts it at seed % len."""

    def __init__(self, tokenizer, max_total_tokens: int = 512, max_input_tokens: int = 500, step_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.config = EngineConfig(model_id="fake/model", max_total_tokens=max_total_tokens,
                                   max_input_tokens=max_input_tokens)
        self.config.resolve_limits(2048)
        self.model_id = "fake/model"
        self.model_dir = Path("/nonexistent")
        self.dtype = "float32"
        self.device = "cpu"
        self.model_path_kind = "native"
        self.adapters = AdapterRegistry(base_model="fake/model")
        self.error: BaseException | None = None
        self.is_ready = False
        self.step_observers: list = []
        self.step_delay = step_delay
        self.fail_at_step: int | None = None
        self.script_ids = tokenizer.encode(SCRIPT, add_special_tokens=False) + [tokenizer.eos_token_id]
        self.blocks_used = 0
        self.num_running = 0
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.seen_params: list = []
        self.seen_prompts: list[list[int]] = []
        self.started = 0
        self.shut_down = 0

    async def start(self) -> None:
        self.started += 1
        await asyncio.sleep(0)
        self.is_ready = True

    async def shutdown(self) -> None:
        self.shut_down += 1

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self.num_running, num_kv_blocks_used=self.blocks_used,
                           kv_cache_usage=self.blocks_used / 256)

    def validate(self, prompt_token_ids, params) -> int:
        cfg = self.config
        self.adapters.index_of(params.adapter_id)  # as the engine: an adapter it does not serve is a 422
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("`inputs` cannot be empty")
        max_new = params.max_new_tokens
        if max_new is None:
            max_new = min(cfg.max_total_tokens - n, 1024)
        if n + max_new > cfg.max_total_tokens:
            raise ValueError(
                f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens}. "
                f"Given: {n} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        if n > cfg.max_input_tokens:
            raise ValueError(f"`inputs` must have less than {cfg.max_input_tokens} tokens. Given: {n}")
        return max_new

    async def load_lora_adapter(self, name: str, path: str) -> None:
        raise ValueError("the fake engine serves no LoRA adapters")

    def unload_lora_adapter(self, name: str) -> None:
        raise KeyError(name)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def compile_grammar(self, params) -> None:
        """The fake has no grammar engine: grammars are accepted and not enforced."""

    def _token(self, tid: int, i: int, top_n: int) -> TokenInfo:
        special = tid == self.tokenizer.eos_token_id
        text = self.tokenizer.decode([tid])
        logprob = -0.05 - 0.1 * (i % 5)
        tops = [TopToken(tid, text, logprob, special)]
        for k in range(1, top_n):
            alt = (tid + k) % len(self.tokenizer)
            tops.append(TopToken(alt, self.tokenizer.decode([alt]), logprob - k, False))
        return TokenInfo(tid, text, logprob, special, tops[:top_n])

    async def generate(self, prompt_token_ids, params, request_id=None, max_new_tokens=None):
        max_new = self.validate(prompt_token_ids, params) if max_new_tokens is None else max_new_tokens
        self.seen_params.append(params)
        self.seen_prompts.append(list(prompt_token_ids))
        rid = request_id or uuid.uuid4().hex
        blocks = math.ceil((len(prompt_token_ids) + max_new) / 16)
        self.blocks_used += blocks
        self.num_running += 1
        start = 0 if params.is_greedy or params.seed is None else params.seed % (len(self.script_ids) - 1)
        order = self.script_ids[start:] + self.script_ids[:start]
        generated: list[int] = []
        emitted = 0
        done = False
        arrival = asyncio.get_running_loop().time()
        try:
            for step in range(max_new):
                await asyncio.sleep(self.step_delay)
                if self.fail_at_step is not None and step == self.fail_at_step:
                    raise RuntimeError("fake engine failure")
                for obs in self.step_observers:
                    obs(StepStats("prefill" if step == 0 else "decode", 0.001, 1, 1))
                tid = order[step % len(order)]
                tok = self._token(tid, step, params.top_n_tokens)
                generated.append(tid)
                text = self.tokenizer.decode([t for t in generated if t != self.tokenizer.eos_token_id])
                reason, cut, matched = None, text, None
                if tok.special and not params.ignore_eos:
                    reason = "eos_token"
                for s in params.stop:
                    idx = text.find(s)
                    if idx >= 0:
                        reason, cut, matched = "stop_sequence", text[:idx], s
                        break
                if reason is None and len(generated) >= max_new:
                    reason = "length"
                if reason is None:
                    # hold back a possible stop-string prefix at the end
                    hold = max((k for s in params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                    safe = text[: len(text) - hold]
                else:
                    safe = cut
                delta, emitted = safe[emitted:], max(emitted, len(safe))
                now = asyncio.get_running_loop().time()
                out = RequestOutput(
                    request_id=rid, new_tokens=[tok], text_delta=delta, finished=reason is not None,
                    finish_reason=reason, generated_text=cut if reason else None, matched_stop=matched,
                    num_prompt_tokens=len(prompt_token_ids), num_generated_tokens=len(generated),
                    seed=params.seed, arrival_time=arrival, first_scheduled_time=arrival + 0.001,
                    first_token_time=now, finished_time=now if reason else None,
                )
                if reason:
                    done = True
                yield out
                if done:
                    self.finished.append(rid)
                    return
        finally:
            self.blocks_used -= blocks
            self.num_running -= 1
            if not done:
                self.aborted.append(rid)
