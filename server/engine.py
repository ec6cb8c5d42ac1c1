"""The synchronous engine: add requests, abort them, and `step()` the batch forward."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from genserve.server.config import EngineConfig
from genserve.server.detokenizer import IncrementalDetokenizer
from genserve.server.fault_injection import check_step, fault_token
from genserve.server.grammar import GrammarCompiler
from genserve.server.kv_cache import KVCacheManager
from genserve.server.lora_adapters import AdapterStats, adapter_stats
from genserve.server.outputs import RequestOutput, TokenInfo, TopToken
from genserve.server.request import Request
from genserve.server.sampler import SamplingRow, make_generator
from genserve.server.sampling_params import SamplingParams
from genserve.server.scheduler import Scheduler, SchedulerConfig
from genserve.server.speculation import NgramProposer, num_accepted
from genserve.server.stopping import grammar_stop, text_stop

logger = logging.getLogger(__name__)

MAX_SPECULATIVE_ROWS = 16


@dataclass(slots=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_kv_blocks_total: int
    num_kv_blocks_used: int
    kv_cache_usage: float
    num_preemptions_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    num_computed_prompt_tokens_total: int
    # per LoRA adapter name: running and waiting requests, tokens generated (only adapters ever asked for)
    adapters: dict[str, AdapterStats] = field(default_factory=dict)
    max_loras: int = 0


@dataclass(slots=True)
class StepStats:
    method: str  # "prefill" when any prompt chunk ran, else "decode"
    duration_s: float  # the forward pass and sampling (TGI's tgi_batch_forward_duration)
    batch_size: int
    num_tokens: int
    num_accepted: list[int] = field(default_factory=list)  # per request that verified drafts: drafts kept
    num_drafts: list[int] = field(default_factory=list)  # ... and drafts proposed
    filter_s: float = 0.0  # updating the batch: finished requests leave, blocks return (tgi_batch_filter_duration)
    decode_s: float = 0.0  # detokenizing and stop checks (tgi_batch_decode_duration)
    next_batch_size: int = 0  # requests still running after the step (tgi_batch_next_size)
    joined_running_batch: bool = False  # new requests started beside running decodes (tgi_batch_concat)


@dataclass(slots=True)
class _RequestState:
    request: Request
    detokenizer: IncrementalDetokenizer
    row: SamplingRow
    seed: int | None
    outputs_text: list[str] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # [None, lp(token 1 | token 0), ...] when asked for
    prompt_top: list[list[tuple[int, float]]] | None = None  # top-n alternatives at each prompt position


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        from genserve.server.model_files import resolve_model
        from genserve.server.model_overrides import apply_rope_flags, apply_tokenizer_config
        from genserve.server.model_runner import configure_threads, resolve_device, resolve_dtype
        from genserve.server.models.hf_fallback import load_hf_config

        self.config = config
        configure_threads(config.num_threads)
        self.model_dir = resolve_model(config.model_id, config.revision)
        self.model_id = config.model_id or "HuggingFaceTB/SmolLM2-135M-Instruct"
        hf_config = load_hf_config(self.model_dir, config.trust_remote_code)  # one-line errors for bad configs
        if not config.use_transformers_fallback:
            from genserve.server.models import native_config

            hf_config = native_config(hf_config)  # a multimodal checkpoint: its text model's config
        apply_rope_flags(hf_config, config.rope_scaling, config.rope_factor)
        self.hf_config = hf_config
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        apply_tokenizer_config(self.tokenizer, config.tokenizer_config_path)
        # a multimodal config under the fallback keeps its limits and vocabulary in its text config
        config.resolve_limits(getattr(hf_config.get_text_config(), "max_position_embeddings", 4096))
        self.device = resolve_device(config.device)
        self.torch_dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        self.eos_token_ids = self._eos_token_ids()
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.grammars = None if config.disable_grammar_support or not GrammarCompiler.available() \
            else GrammarCompiler(self.tokenizer)
        from genserve.server.lora_adapters import AdapterRegistry, load_registry

        # checked before any weight loads: a bad adapter is a one-line start-up error
        self.adapters = load_registry(config.lora_adapters, hf_config, self.model_id, config.max_loras,
                                      config.max_lora_rank) if config.is_lora_enabled \
            else AdapterRegistry(base_model=self.model_id)
        self.runner = self._make_runner(hf_config)
        self.model_path_kind = getattr(self.runner, "model_path_kind", "native")  # /info: which path serves
        logger.info("model path: %s (%s)", self.model_path_kind, getattr(hf_config, "architectures", None))
        # the fallback keeps K/V per request, so cached blocks elsewhere cannot stand in for them
        prefix_caching = config.enable_prefix_caching and self.runner.supports_prefix_caching
        # every layer windowed: blocks behind the window go back to the pool (their entries -> the scratch block)
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size, prefix_caching,
                                       getattr(self.runner, "kv_sliding_window", None))
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_prefill_tokens=config.max_batch_prefill_tokens,
                max_batch_size=config.max_batch_size,
                waiting_served_ratio=config.waiting_served_ratio,
                max_waiting_tokens=config.max_waiting_tokens,
                policy=config.scheduling_policy,
                max_loras=config.max_loras if config.is_lora_enabled else 0,
                long_rope_from=getattr(self.runner, "long_rope_from", None),
            ),
            self.kv_cache,
        )
        self.proposer = NgramProposer(config.speculate) if config.speculate else None
        # decode rows (drafts included) up to which drafting goes on; beyond, a step is bound by compute
        self.max_speculative_rows = MAX_SPECULATIVE_ROWS
        # greedy decode steps run back to back where the runner can (--num-scheduler-steps)
        self.num_scheduler_steps = config.num_scheduler_steps
        if self.num_scheduler_steps > 1 and not getattr(self.runner, "has_greedy_steps", False):
            logger.warning("--num-scheduler-steps %d: this model runs one decode step at a time (steps back to back "
                           "need the fused CPU decode of grouped weights, embedding and LM head included)",
                           self.num_scheduler_steps)
            self.num_scheduler_steps = 1
        self.states: dict[str, _RequestState] = {}
        self.step_request_ids: list[str] = []  # the last step's batch: a failed step fails only these
        self.fault_token = fault_token()  # test-only (genserve.server.fault_injection); None in production
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_computed_prompt_tokens_total = 0
        self.adapter_tokens: dict[int, int] = {}  # adapter index -> tokens generated

    def _make_runner(self, hf_config):
        from genserve.server.models import get_model_class
        from genserve.server.models.hf_fallback import check_safetensors_headers

        if self.config.load_format != "dummy":
            check_safetensors_headers(self.model_dir)  # before any worker or weight: a one-line error

        native = not self.config.use_transformers_fallback and get_model_class(
            getattr(hf_config, "architectures", None)) is not None
        if self.config.is_lora_enabled and (not native or getattr(hf_config, "is_encoder_decoder", False)):
            raise ValueError("LoRA adapters need a native decoder implementation; "
                             f"{getattr(hf_config, 'architectures', None)} runs through transformers here")
        if getattr(hf_config, "is_encoder_decoder", False):  # T5, BART: the prompt is the encoder input
            from genserve.server.seq2seq_runner import make_seq2seq_runner

            return make_seq2seq_runner(self.config, hf_config, self.model_dir, self.device, self.torch_dtype)
        if self.config.use_transformers_fallback or get_model_class(getattr(hf_config, "architectures", None)) is None:
            from genserve.server.fallback_runner import FallbackRunner

            if self.config.speculate:
                raise ValueError("--speculate needs a native model implementation; the transformers fallback "
                                 f"({getattr(hf_config, 'architectures', None)}) decodes one token at a time")
            if self.config.num_shard > 1:
                raise ValueError("--num-shard > 1 needs a native model implementation; the transformers "
                                 f"fallback ({getattr(hf_config, 'architectures', None)}) runs on one device")
            if self.config.use_transformers_fallback:
                logger.info("--use-transformers-fallback: serving %s through transformers (no paged cache)",
                            getattr(hf_config, "architectures", None))
            else:
                logger.warning("no native implementation for %s: using the transformers fallback (no paged cache)",
                               getattr(hf_config, "architectures", None))
            return FallbackRunner(self.config, hf_config, self.model_dir, self.device, self.torch_dtype)
        from genserve.server.model_runner import ModelRunner

        if self.config.num_shard > 1:
            from genserve.server.worker import start_tensor_parallel

            # rank 0 is this process; under an external launcher a rank > 0 never returns from here
            self.device = start_tensor_parallel(self.config, hf_config, self.model_dir, self.device,
                                                self.torch_dtype)
        return ModelRunner(self.config, hf_config, self.model_dir, self.device, self.torch_dtype,
                           adapters=self.adapters if self.config.is_lora_enabled else None)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any; the engine is unusable after."""
        shutdown = getattr(self.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def _eos_token_ids(self) -> frozenset[int]:
        ids = set()
        gen_config = Path(self.model_dir) / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the limits; returns its max_new_tokens. Raises ValueError (TGI wording)."""
        cfg = self.config
        params.validate(cfg.max_stop_sequences, cfg.max_top_n_tokens)
        self.adapters.index_of(params.adapter_id)
        num_input = len(prompt_token_ids)
        if num_input == 0:
            raise ValueError("`inputs` cannot be empty")
        if num_input > cfg.max_input_tokens:
            raise ValueError(f"`inputs` must have less than {cfg.max_input_tokens} tokens. Given: {num_input}")
        max_new = params.max_new_tokens if params.max_new_tokens is not None else cfg.max_total_tokens - num_input
        if num_input + max_new > cfg.max_total_tokens:
            raise ValueError(
                f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens}. "
                f"Given: {num_input} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        vocab = self.hf_config.get_text_config().vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"`logit_bias` token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"`stop_token_ids` must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.allowed_token_ids or ()):
            raise ValueError(f"`allowed_token_ids` must be in [0, {vocab})")
        if any(not 0 <= t < vocab for word in params.bad_words_token_ids for t in word):
            raise ValueError(f"`bad_words` token ids must be in [0, {vocab})")
        if params.grammar is not None:
            if self.grammars is None:
                raise ValueError("grammar is not supported")
            self.grammars.compile(params.grammar)  # cached: add_request builds the matcher from it
        return max_new

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    max_new_tokens: int | None = None) -> str:
        """Queue a request; `max_new_tokens` is `validate()`'s result when the caller already validated."""
        max_new = max_new_tokens if max_new_tokens is not None else self.validate(prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, list(prompt_token_ids), params, max_new_tokens=max_new,
                          eos_token_ids=self.eos_token_ids, adapter_index=self.adapters.index_of(params.adapter_id))
        generator = None
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(uuid.uuid4().bytes[:8], "little")
            generator = make_generator(seed, self.device)
        else:
            seed = params.seed
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                       skip_special_tokens=params.skip_special_tokens, stop=params.stop)
        row = SamplingRow(params=params, generator=generator, token_ids=request.token_ids,
                          num_prompt_tokens=request.num_prompt_tokens, eos_token_ids=self.eos_token_ids)
        if params.grammar is not None:
            if self.grammars is None:
                raise ValueError("grammar is not supported")
            row.grammar = self.grammars.matcher(params.grammar)
        self.states[request_id] = _RequestState(request, detok, row, seed)
        self.scheduler.add_request(request)
        self.num_prompt_tokens_total += len(prompt_token_ids)
        return request_id

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        if self.states.pop(request_id, None) is not None:
            self.runner.release(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> tuple[list[RequestOutput], StepStats | None]:
        """Schedule, run one forward over the whole batch, sample, and report each request's progress."""
        self.step_request_ids = []
        out = self.scheduler.schedule()
        for request in out.preempted:
            self.runner.release(request.request_id)
        if out.is_empty:
            return [], None
        self.step_request_ids = [s.request.request_id for s in out.scheduled]
        rows = {s.request.request_id: self.states[s.request.request_id].row for s in out.scheduled}
        if self.num_scheduler_steps > 1 and not self.scheduler.waiting and self.runner.runs_greedy_steps(out, rows):
            self.scheduler.run_ahead(out, self.num_scheduler_steps)
        check_step(self.fault_token, out.scheduled)
        started = time.perf_counter()
        has_prefill = any(s.num_new_tokens > 1 or s.request.num_computed_tokens < s.request.num_prompt_tokens
                          for s in out.scheduled)
        self.num_computed_prompt_tokens_total += sum(
            min(s.num_new_tokens, max(s.request.num_prompt_tokens - s.request.num_computed_tokens, 0))
            for s in out.scheduled)
        joined = (any(s.request.num_computed_tokens == 0 for s in out.scheduled)
                  and any(s.request.num_computed_tokens >= s.request.num_prompt_tokens for s in out.scheduled))
        order, result, prompt_logprobs = self.runner.execute(out, rows)
        for request_id, (first, values, tops) in prompt_logprobs.items():
            state = self.states[request_id]
            if state.prompt_logprobs is None:
                state.prompt_logprobs = [None] * state.request.num_prompt_tokens
                state.prompt_top = [[] for _ in range(state.request.num_prompt_tokens)]
            # a recomputed request scores its prompt again; the first scores stand (preempted: the same values;
            # outgrown LongRoPE's original length: transformers scored the prompt with the short factors)
            for j, value in enumerate(values, first):
                if state.prompt_logprobs[j] is None:
                    state.prompt_logprobs[j] = value
                    if tops:
                        state.prompt_top[j] = tops[j - first]
        # a request with drafts has a sampled row after its last token and after each draft
        first_rows, sampled, row = [], {}, 0
        for s in order:
            first_rows.append(row)
            sampled[s.request.request_id] = result.token_ids[row:row + s.num_samples]
            row += s.num_samples
        num_tokens_before = [s.request.num_tokens for s in order]
        forwarded = time.perf_counter()
        self.scheduler.update_from_output(out, sampled)
        stats = StepStats("prefill" if has_prefill else "decode", forwarded - started,
                          len(out.scheduled), out.num_batched_tokens + sum(s.num_steps - 1 for s in out.scheduled),
                          [num_accepted(s.draft_token_ids, sampled[s.request.request_id])
                           for s in order if s.draft_token_ids],
                          [len(s.draft_token_ids) for s in order if s.draft_token_ids])
        filtered = time.perf_counter()
        outputs = [self._process_tokens(s.request, first, s.request.num_tokens - before, result)
                   for s, first, before in zip(order, first_rows, num_tokens_before, strict=True)]
        stats.filter_s, stats.decode_s = filtered - forwarded, time.perf_counter() - filtered
        stats.next_batch_size, stats.joined_running_batch = len(self.scheduler.running), joined
        self.num_generation_tokens_total += sum(len(o.new_tokens) for o in outputs)
        if self.adapters.adapters:
            for s, o in zip(order, outputs, strict=True):
                if s.request.adapter_index:
                    index = s.request.adapter_index
                    self.adapter_tokens[index] = self.adapter_tokens.get(index, 0) + len(o.new_tokens)
        if self.proposer is not None:
            self._propose_drafts()
        return outputs, stats

    def _propose_drafts(self) -> None:
        """Draft the next tokens of running greedy decodes while the step stays small: verifying a draft
        costs a row of compute, which is nearly free only while the step is bound by reading weights."""
        num_rows = len(self.scheduler.running)
        for request in self.scheduler.running:
            room = min(request.max_new_tokens - request.num_output_tokens - 1,
                       self.config.speculate, self.max_speculative_rows - num_rows)
            if (room <= 0 or request.num_tokens - request.num_computed_tokens != 1
                    or not request.sampling_params.is_greedy or self.states[request.request_id].row.grammar):
                continue
            request.spec_token_ids = self.proposer.propose(request.token_ids)[:room]
            num_rows += len(request.spec_token_ids)

    def _process_tokens(self, request: Request, first_row: int, num_tokens: int, result) -> RequestOutput:
        """Detokenize the request's new tokens (rows first_row.. of the step's draws) and apply stop
        sequences and grammars; a stop sequence drops the tokens after it."""
        state = self.states[request.request_id]
        infos, text_delta, matched_stop = [], "", None
        new_ids = request.token_ids[request.num_tokens - num_tokens:]
        for j, token_id in enumerate(new_ids):
            index = first_row + j
            step = state.detokenizer.add_token(token_id)
            text_delta += step.text_delta
            tops = [TopToken(t, self.tokenizer.decode([t]), lp, t in self.special_ids)
                    for t, lp in result.top_tokens[index]]
            infos.append(TokenInfo(token_id, step.token_text, result.logprobs[index], token_id in self.special_ids,
                                   tops))
            if (stop := text_stop(step.matched_stop)) is not None:
                matched_stop = step.matched_stop
                del request.token_ids[request.num_tokens - (len(new_ids) - 1 - j):]
                self.scheduler.finish_request(request, *stop)
                request.finish_reason = stop[1]  # also when the same token hit the length limit
                break
        grammar = state.row.grammar
        if grammar is not None and not request.is_finished:
            token_id = new_ids[-1]  # a grammar request never drafts: one token per step
            stop, rejected = grammar_stop(grammar, token_id)
            if rejected:  # cannot happen with the mask applied; never loop on it
                logger.error("grammar rejected token %d: %s", token_id, grammar.error,
                             extra={"request_id": request.request_id})
            if stop is not None:
                self.scheduler.finish_request(request, *stop)
        output = RequestOutput(
            request_id=request.request_id,
            new_tokens=infos,
            text_delta=text_delta,
            num_prompt_tokens=request.num_prompt_tokens,
            num_generated_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_prompt_tokens,
            seed=state.seed,
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
        )
        if request.num_output_tokens == 1 and request.sampling_params.prompt_logprobs:
            output.prompt_logprobs = state.prompt_logprobs or [None] * request.num_prompt_tokens
            output.prompt_top_tokens = [
                [TopToken(t, self.tokenizer.decode([t]), lp, t in self.special_ids) for t, lp in position]
                for position in (state.prompt_top or [[] for _ in range(request.num_prompt_tokens)])]
        if request.is_finished:
            if matched_stop is None:
                output.text_delta += state.detokenizer.flush()
            output.finished = True
            output.finish_reason = request.finish_reason
            output.generated_text = state.detokenizer.output_text
            output.matched_stop = matched_stop
            output.finished_time = time.monotonic()
            del self.states[request.request_id]
            self.runner.release(request.request_id)
        return output

    def stats(self) -> EngineStats:
        kv = self.kv_cache
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_kv_blocks_total=kv.num_blocks,
            num_kv_blocks_used=kv.num_used_blocks,
            kv_cache_usage=kv.usage,
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries_total=kv.prefix_cache_queries,
            prefix_cache_hits_total=kv.prefix_cache_hits,
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generation_tokens_total=self.num_generation_tokens_total,
            num_computed_prompt_tokens_total=self.num_computed_prompt_tokens_total,
            adapters=adapter_stats(self.adapters, self.adapter_tokens, self.scheduler.running,
                                   self.scheduler.waiting),
            max_loras=self.config.max_loras if self.config.is_lora_enabled else 0,
        )


    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Offline helper: run prompts to completion, return each one's generated token ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished:
            outputs, _ = self.step()
            for o in outputs:
                tokens[o.request_id].extend(t.id for t in o.new_tokens)
        return [tokens[i] for i in ids]
