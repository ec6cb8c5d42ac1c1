"""Turn a scheduled step into tensors, run the model over the paged KV cache, and sample.

A step crosses between host and device once each way: the payload below goes to the device in one
copy, and everything the host reads back (draws, log-probabilities, prompt scores) comes back in
one (genserve.server.transfer).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import torch

from genserve.server import cpu_env, distributed, warmup
from genserve.server.config import EngineConfig
from genserve.server.graphs import DecodeGraphs, graph_batch_sizes
from genserve.server.layers import grouped_linear
from genserve.server.layers.attention import (
    STATIC_DECODE_BACKENDS,
    Attention,
    AttentionMetadata,
    choose_decode_backend,
    flash_attention_usable,
    forward_context,
    set_decode_metadata,
)
from genserve.server.layers.cpu_packing import pack_model_for_cpu
from genserve.server.layers.kv_storage import is_float8, resolve_kv_cache_dtype
from genserve.server.layers.lora import lora_context
from genserve.server.layers.quantization import quantize_model
from genserve.server.layers.rotary import longrope_original_length
from genserve.server.models import fused_decode, get_model_class
from genserve.server.prompt_scores import (
    PromptScores,
    PromptTarget,
    prompt_scores_on_device,
    unpack_prompt_scores,
)
from genserve.server.sampler import Sampler, SampleResult, SamplingRow, plain_greedy
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput
from genserve.server.step_payload import HEADER_SIZE, SHUTDOWN_HEADER, StepHeader, StepLayout, pack_step
from genserve.server.transfer import to_device, to_host

logger = logging.getLogger(__name__)

# what a runner's execute() returns: sampling requests in order, their draws, and the prompt scores
StepOutput = tuple[list[ScheduledRequest], SampleResult | None, dict[str, PromptScores]]


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [N] row of each sampling request's last token
    sampling_order: list[ScheduledRequest]  # rank 0 only
    prompt_rows: torch.Tensor | None = None  # [R] rows whose logits score the next prompt token
    prompt_token_ids: torch.Tensor | None = None  # [R] the prompt token each of those rows scores
    prompt_targets: list[PromptTarget] | None = None  # rank 0 only
    graph_bucket: int | None = None  # a decode-only step run by DecodeGraphs, padded to this many rows
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] (graph steps)
    decode_context_lens: torch.Tensor | None = None  # [B] (graph steps)
    lora_segments: list[tuple[int, int, int]] | None = None  # rows [start, end) and their LoRA adapter


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name in ("auto", None):
        if device.type == "cpu":
            return torch.bfloat16 if cpu_env.has_native_bf16() else torch.float32
        saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        saved = getattr(torch, saved, None) if isinstance(saved, str) else saved
        return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(dtypes)} or auto")
    return dtypes[name]


def resolve_device(name: str) -> torch.device:
    if name in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def kv_bytes_per_token(hf_config, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * hf_config.num_hidden_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


class ModelRunner:
    supports_prefix_caching = True

    def __init__(self, config: EngineConfig, hf_config, model_dir, device: torch.device, dtype: torch.dtype,
                 adapters=None) -> None:
        from genserve.server.loader import load_weights

        self.config = config
        self.device = device
        self.dtype = dtype
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)  # --kv-cache-dtype: the pool's dtype
        self.tp_size = distributed.get_tp_size()
        model_cls = get_model_class(getattr(hf_config, "architectures", None))
        assert model_cls is not None, "the engine picks the transformers fallback for unknown architectures"
        with torch.device(device):
            self.model = model_cls(hf_config, dtype=dtype)
        self.lora = self._lora_store(hf_config, adapters) if config.is_lora_enabled else None
        # read by grouped_linear.choose_kernels while the weights load: which of our kernels it times
        self.model.int8_activations = config.activation_quantization == "int8"
        load_weights(self.model, model_dir, config.load_format)
        quantize_model(self.model, config.quantize)
        if self.model.int8_activations:
            grouped_linear.use_int8_activations(self.model)
        if device.type == "cpu":
            pack_model_for_cpu(self.model)
        self.model.eval()
        self.weight_bytes = sum({p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}.values())
        logger.info("rank %d/%d holds %.1f MiB of weights", distributed.get_tp_rank(), self.tp_size,
                    self.weight_bytes / 2**20)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        first = self.attention_layers[0]
        self.block_size = config.block_size
        # soft-capping or ALiBi in any layer: FlashAttention cannot change scores, so it serves no step
        score_mods = any(layer.has_score_mods for layer in self.attention_layers)
        self.decode_backend, self.decode_flash = choose_decode_backend(device, dtype, first.head_dim, self.block_size,
                                                                       score_mods, is_float8(self.kv_dtype))
        self.prefill_flash = flash_attention_usable(device, dtype, first.head_dim) and not score_mods
        logger.info("decode attention: %s%s; prefill: %s", self.decode_backend,
                    " (FlashAttention)" if self.decode_flash else "",
                    "FlashAttention varlen" if self.prefill_flash else "SDPA per sequence")
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        # the largest step, run before sizing the pool: its peak is memory the pool must leave free
        self.activation_bytes = 0
        if config.max_batch_total_tokens is None or device.type == "cuda":
            self.activation_bytes = warmup.profile_max_step(self)
        self.num_blocks = self._num_kv_blocks(hf_config)
        # one block past the manager's: padding rows write only there, and the manager's null_block (the
        # entries of blocks freed behind a sliding window) points there
        self.scratch_block = self.num_blocks
        windows = [layer.sliding_window for layer in self.attention_layers]
        # blocks behind the window can go back to the pool only when every layer has one
        self.kv_sliding_window = None if None in windows else max(windows)
        self.long_rope_from = longrope_original_length(hf_config)  # the scheduler picks each request's factors
        if any(windows):
            logger.info("sliding window: %s on %d of %d layers; %s", sorted({w for w in windows if w}),
                        sum(bool(w) for w in windows), len(windows),
                        "blocks behind it return to the pool" if self.kv_sliding_window else
                        "every block kept (the other layers attend fully)")
        self._allocate_kv_cache()
        # single-stream decode steps pick the one-row kernels' prefetch distance (one process: rank 0 alone
        # would tune only its own shard)
        self.prefetch_tuner = grouped_linear.PrefetchTuner.for_model(self.model) \
            if device.type == "cpu" and self.tp_size == 1 else None
        if device.type == "cpu" and self.decode_backend == "kernel":
            fused, why = fused_decode.build(self.model, self.tp_size, self.lora is not None)
            if fused is not None:
                self.model.body.fused_decode = fused
            logger.info("fused decode step (one native call per step): %s", why)
        buckets = graph_batch_sizes(config.cuda_graphs, device, config.max_batch_size)
        if buckets:
            self.enable_decode_graphs(buckets, capture=device.type == "cuda")

    @property
    def has_greedy_steps(self) -> bool:
        """The fused decode can run greedy steps itself (models/fused_decode.py), LM head and pick included."""
        fused = getattr(self.model.body, "fused_decode", None) if hasattr(self.model, "body") else None
        return (getattr(fused, "runs_greedy_steps", False) and self.graphs is None and self.lora is None
                and self.dtype == torch.float32)

    def runs_greedy_steps(self, out: SchedulerOutput, rows: dict[str, SamplingRow]) -> bool:
        """The step goes to the fused greedy steps: decodes only (one new token past the prompt, no drafts), every
        row a plain greedy pick (nothing masked, no top-n), few enough rows for the fused kernel."""
        return (self.has_greedy_steps and 0 < len(out.scheduled) <= fused_decode.FUSED_MAX_ROWS
                and all(_is_decode(s) and plain_greedy(rows[s.request.request_id]) for s in out.scheduled))

    def _lora_store(self, hf_config, adapters):
        """LoRA layers on the model before any weight loads (a bad adapter fails fast); `adapters`: the engine's
        checked registry on rank 0, read again from the config on the other ranks."""
        from genserve.server.lora_adapters import load_registry
        from genserve.server.lora_store import LoRAStore

        cfg = self.config
        if adapters is None:
            adapters = load_registry(cfg.lora_adapters, hf_config, cfg.model_id, cfg.max_loras, cfg.max_lora_rank)
        store = LoRAStore(self.model, adapters, self.dtype, self.device)
        store.ensure(set(list(adapters.adapters)[:cfg.max_loras]))
        return store

    @property
    def use_paged_kernel(self) -> bool:
        return self.decode_backend == "kernel"

    @use_paged_kernel.setter
    def use_paged_kernel(self, value: bool) -> None:
        self.decode_backend, self.decode_flash = ("kernel", False) if value else ("gather", False)

    def enable_decode_graphs(self, buckets: list[int], capture: bool) -> None:
        """Run decode-only steps of up to max(buckets) rows padded to a bucket on static buffers; captured as
        CUDA graphs when `capture` (CUDA only), run eagerly on the same buffers otherwise (tests on CPU)."""
        if self.decode_backend not in STATIC_DECODE_BACKENDS:
            logger.warning("CUDA graphs off: decode attention %r has no static shapes (with FlashAttention, a "
                           "--block-size that is a multiple of 256 reads the pool in place and can be captured)",
                           self.decode_backend)
            return
        max_blocks = -(-self.config.max_total_tokens // self.block_size)
        self.graphs = DecodeGraphs(self.model, buckets, max_blocks, self.block_size, self.scratch_block,
                                   self.decode_backend, self.decode_flash, self.device, capture)

    def _num_kv_blocks(self, hf_config) -> int:
        first = self.attention_layers[0]
        per_token = kv_bytes_per_token(hf_config, first.num_kv_heads, first.head_dim, self.kv_dtype)
        if self.config.max_batch_total_tokens is not None:
            tokens = self.config.max_batch_total_tokens
        else:
            fraction = self.config.kv_cache_memory_fraction
            if self.device.type == "cpu":
                # the host runs everything else too: never take more than a quarter of free RAM
                fraction = min(fraction, 0.25) / self.tp_size
            budget = int(available_memory(self.device) * fraction) - self.activation_bytes
            tokens = self._tokens_within(budget, per_token // hf_config.num_hidden_layers)
            # more than every slot of a full batch at max length is wasted memory
            tokens = min(tokens, self.config.max_batch_size * self.config.max_total_tokens)
        num_blocks = max(tokens, 0) // self.block_size
        if self.tp_size > 1:
            # every rank must hold the same blocks: the smallest cache wins
            num_blocks = distributed.all_reduce_min_cpu(num_blocks)
        if num_blocks * self.block_size < self.config.max_total_tokens:
            raise ValueError(
                f"the KV cache holds {num_blocks * self.block_size} tokens, less than one request of "
                f"`max_total_tokens` ({self.config.max_total_tokens}); raise --max-batch-total-tokens"
            )
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s)", num_blocks, self.block_size,
                    num_blocks * self.block_size * per_token / 2**20, str(self.kv_dtype).removeprefix("torch."))
        return num_blocks

    def _tokens_within(self, budget: int, per_layer_token: int) -> int:
        """Pool tokens that fit in `budget` bytes beside the copies decode attention makes of one layer's
        contexts: padded to the longest (gather), or packed, at most the pool's share of a layer (varlen)."""
        per_token = per_layer_token * len(self.attention_layers)
        if self.decode_backend == "gather":
            budget -= self.config.max_batch_size * self.config.max_total_tokens * per_layer_token
        elif self.decode_backend == "varlen":
            per_token += per_layer_token
        return budget // per_token

    def _allocate_kv_cache(self) -> None:
        num_slots = (self.num_blocks + 1) * self.block_size  # + the scratch block
        for layer in self.attention_layers:
            shape = (num_slots, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Rank 0: flatten the step into one int64 tensor, broadcast it at tp > 1, and unpack it."""
        header, values, sampling_order, prompt_targets = pack_step(out, self.block_size)
        payload = torch.tensor(values, dtype=torch.long)
        if self.tp_size > 1:
            distributed.broadcast_cpu(torch.tensor(header.to_list(), dtype=torch.long))
            distributed.broadcast_cpu(payload)
        inputs = self._unpack(header, values, payload)
        inputs.sampling_order = sampling_order
        inputs.prompt_targets = prompt_targets
        return inputs

    def local_inputs(self, out: SchedulerOutput) -> StepInputs:
        """A step's inputs on this rank alone, never broadcast (the warm-up steps every rank runs itself)."""
        header, values, sampling_order, prompt_targets = pack_step(out, self.block_size)
        inputs = self._unpack(header, values)
        inputs.sampling_order, inputs.prompt_targets = sampling_order, prompt_targets
        return inputs

    def receive(self) -> StepInputs | None:
        """Rank > 0: the next step from rank 0, or None when rank 0 shuts down."""
        header = StepHeader.from_list(distributed.broadcast_cpu(torch.empty(HEADER_SIZE, dtype=torch.long)).tolist())
        if header is None:
            return None
        payload = distributed.broadcast_cpu(torch.empty(header.payload_len, dtype=torch.long))
        return self._unpack(header, payload.tolist(), payload)

    def _unpack(self, header: StepHeader, values: list[int], payload: torch.Tensor | None = None) -> StepInputs:
        # `values` is the payload on the host, so nothing here reads the device
        at = StepLayout.of(header)
        num_decodes, num_prefills, max_blocks = header.num_decodes, header.num_prefills, header.max_blocks
        bs = self.block_size
        t = to_device(payload if payload is not None else values, self.device)  # the step's one copy in
        lens, host_lens = t[at.decode_lens], values[at.decode_lens]
        begins, ends = values[at.prefill_begins], values[at.prefill_ends]
        inputs = StepInputs(
            input_ids=t[at.input_ids],
            positions=t[at.positions],
            meta=AttentionMetadata(slot_mapping=t[:0], num_decode_tokens=num_decodes),
            sample_indices=t[at.sample_rows],
            sampling_order=[],
        )
        if header.num_prompt_rows:
            inputs.prompt_rows, inputs.prompt_token_ids = t[at.prompt_rows], t[at.prompt_token_ids]
        if header.num_lora_segments:
            flat = values[at.lora_segments]
            inputs.lora_segments = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
            self.lora.ensure({index for _, _, index in inputs.lora_segments})
        meta, slots = inputs.meta, []
        if num_decodes:
            table = t[at.decode_tables].view(num_decodes, max_blocks)
            # LoRA steps run eagerly: the graphs hold no per-step adapter segments
            if self.graphs is not None and num_decodes == header.num_tokens and not inputs.lora_segments:
                inputs.graph_bucket = self.graphs.bucket_for(num_decodes, max_blocks)
            if inputs.graph_bucket is not None:  # DecodeGraphs builds the metadata from its own buffers
                inputs.decode_block_tables, inputs.decode_context_lens = table, lens
                return inputs
            slots.append(t[at.decode_slots])
            set_decode_metadata(meta, self.decode_backend, table, lens, bs, header.max_len, host_lens,
                                self.decode_flash)
        offsets = torch.arange(bs, device=self.device) if num_prefills else None
        starts, contexts = [0], []
        o = at.prefill_blocks.start
        for begin, end in zip(begins, ends, strict=True):
            num_blocks = -(-end // bs)
            context_slots = (t[o:o + num_blocks, None] * bs + offsets).view(-1)[:end]
            o += num_blocks
            slots.append(context_slots[begin:])
            starts.append(starts[-1] + end - begin)
            meta.prefill_context_lens.append(end)
            meta.prefill_gather_index.append(context_slots if begin > 0 else None)
            contexts.append(context_slots)
        meta.prefill_starts = starts
        if self.prefill_flash and num_prefills:
            meta.prefill_flash = True
            meta.prefill_slots = torch.cat(contexts) if len(contexts) > 1 else contexts[0]
            spans = t[at.prefill_begins.start:at.prefill_ends.stop].view(2, num_prefills)
            meta.prefill_cu_queries = t.new_zeros(num_prefills + 1, dtype=torch.int32)
            meta.prefill_cu_queries[1:] = (spans[1] - spans[0]).cumsum(0)
            meta.prefill_cu_lens = t.new_zeros(num_prefills + 1, dtype=torch.int32)
            meta.prefill_cu_lens[1:] = spans[1].cumsum(0)
        meta.slot_mapping = torch.cat(slots) if len(slots) > 1 else slots[0] if slots else t[:0]
        return inputs

    def forward(self, inputs: StepInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every rank: the model over this rank's shard; logits [N, vocab] for the sampling rows, and
        [R, vocab] for the prompt rows whose log-probabilities were asked for."""
        if inputs.graph_bucket is not None:
            hidden = self.graphs.run(inputs.graph_bucket, inputs.input_ids, inputs.positions,
                                     inputs.decode_block_tables, inputs.decode_context_lens)
        else:
            with forward_context(inputs.meta), lora_context(inputs.lora_segments or []):
                hidden = self.model(inputs.input_ids, inputs.positions)
        prompt_logits = None
        if inputs.prompt_rows is not None:
            prompt_logits = self.model.compute_logits(hidden[inputs.prompt_rows])
        if inputs.sample_indices.shape[0] == 0:
            return None, prompt_logits
        return self.model.compute_logits(hidden[inputs.sample_indices]), prompt_logits

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepOutput:
        """Run one step: the sampling requests in order, their sampled tokens, and prompt log-probabilities."""
        if self.tp_size == 1:
            return self._execute(out, rows)
        try:
            return self._execute(out, rows)
        except Exception:
            # a failed step leaves the ranks out of step with each other: only a restart recovers
            logger.critical("tensor-parallel step failed on rank 0: exiting", exc_info=True)
            os._exit(1)

    def _execute(self, out: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepOutput:
        tuner = self.prefetch_tuner
        if tuner is not None and tuner.active and len(out.scheduled) == 1 and _is_decode(out.scheduled[0]):
            distance, start = tuner.next_distance(), time.perf_counter()
            result = self._execute_step(out, rows)
            tuner.record(distance, (time.perf_counter() - start) / out.scheduled[0].num_steps)
            return result
        return self._execute_step(out, rows)

    def _execute_step(self, out: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepOutput:
        if self.runs_greedy_steps(out, rows):
            return self._greedy_steps(out)
        inputs = self.prepare(out)
        logits, prompt_logits = self.forward(inputs)
        targets = inputs.prompt_targets or []
        scores = prompt_scores_on_device(prompt_logits, inputs.prompt_token_ids, targets)
        order = inputs.sampling_order if logits is not None else []
        pending = self.sampler.sample(logits.float(), sampling_rows(order, rows)) if order else None
        parts = [p for p in (pending.packed if pending else None, scores) if p is not None]
        host = to_host(parts) if parts else []  # the step's one copy out
        result = pending.result(host.pop(0)) if pending else None
        prompt_logprobs = unpack_prompt_scores(host.pop(0), targets) if scores is not None else {}
        return order, result, prompt_logprobs

    def _greedy_steps(self, out: SchedulerOutput) -> StepOutput:
        """Every row's next `num_steps` greedy tokens from one native call (tensor parallelism and LoRA never
        come here, so the step is not broadcast): the inputs of its first step, a slot per token for each step,
        block tables covering them all."""
        steps, bs = out.scheduled[0].num_steps, self.block_size
        max_blocks = -(-max(s.request.num_computed_tokens + steps for s in out.scheduled) // bs)
        tokens, positions, slots, tables = [], [], [], []
        for s in out.scheduled:
            request = s.request
            pos = request.num_computed_tokens
            tokens.append(request.token_ids[pos])
            positions.append(pos)
            slots += [request.block_ids[p // bs] * bs + p % bs for p in range(pos, pos + steps)]
            blocks = request.block_ids[:max_blocks]
            tables += blocks + [0] * (max_blocks - len(blocks))
        values = torch.tensor(tokens + positions + slots + tables, dtype=torch.long)
        b = len(tokens)
        lens = values[b:2 * b] + 1
        picked = self.model.body.fused_decode.greedy_steps(
            values[:b], values[b:2 * b], steps, values[2 * b:2 * b + b * steps],
            values[2 * b + b * steps:].view(b, max_blocks), lens, bs)
        host = picked.tolist()
        result = SampleResult(token_ids=[int(r[0]) for r in host], logprobs=[r[1] for r in host],
                              top_tokens=[[] for _ in host])
        return out.scheduled, result, {}

    def shutdown(self) -> None:
        """Rank 0: tell the workers to stop, join them and leave the process group."""
        if self.tp_size > 1:
            distributed.broadcast_cpu(torch.tensor(SHUTDOWN_HEADER, dtype=torch.long))
            distributed.shutdown()
            self.tp_size = 1

    def release(self, request_id: str) -> None:
        """Paged runners keep nothing per request; the fallback runner drops its cache here."""


def _is_decode(scheduled: ScheduledRequest) -> bool:
    """One new token past the prompt (not a one-token prompt chunk, not drafts)."""
    return (scheduled.num_new_tokens == 1 and not scheduled.draft_token_ids
            and scheduled.request.num_computed_tokens >= scheduled.request.num_prompt_tokens)


def sampling_rows(order: list[ScheduledRequest], rows: dict[str, SamplingRow]) -> list[SamplingRow]:
    """One row per sampled position: a request with drafts samples after its last token and after each
    draft, each with the history up to there (for penalties and min_tokens)."""
    out = []
    for s in order:
        row = rows[s.request.request_id]
        out.append(row)
        drafts = s.draft_token_ids
        out += [dataclasses.replace(row, token_ids=row.token_ids + drafts[:i]) for i in range(1, len(drafts) + 1)]
    return out


def configure_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
