"""Turn a scheduled step into tensors, run the model over the paged KV cache, and sample."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from genserve.server import cpu_env, distributed, kernels
from genserve.server.config import EngineConfig
from genserve.server.layers.attention import Attention, AttentionMetadata, forward_context
from genserve.server.layers.cpu_packing import pack_model_for_cpu
from genserve.server.layers.quantization import quantize_model
from genserve.server.models import get_model_class
from genserve.server.sampler import Sampler, SampleResult, SamplingRow
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)

# step header: [is_step, num_tokens, num_decodes, max_blocks, num_prefills, num_samples, max_len, payload_len,
#               num_prompt_logprob_rows]
HEADER_SIZE = 9


# (request id, prompt position of the first scored token, the scored token ids, top-n alternatives wanted)
PromptTarget = tuple[str, int, list[int], int]
# per request: (prompt position of the first scored token, log-probabilities, top-n (id, logprob) lists)
PromptScores = tuple[int, list[float], list[list[tuple[int, float]]]]
# what a runner's execute() returns: sampling requests in order, their draws, and the prompt scores
StepOutput = tuple[list[ScheduledRequest], SampleResult | None, dict[str, PromptScores]]
# rows of prompt logits turned into log-probabilities at a time: [rows, vocab] float copies stay small
SCORE_ROWS = 256


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [N] row of each sampling request's last token
    sampling_order: list[ScheduledRequest]  # rank 0 only
    prompt_rows: torch.Tensor | None = None  # [R] rows whose logits score the next prompt token
    prompt_targets: list[PromptTarget] | None = None  # rank 0 only


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

    def __init__(self, config: EngineConfig, hf_config, model_dir, device: torch.device, dtype: torch.dtype) -> None:
        from genserve.server.loader import load_weights

        self.config = config
        self.device = device
        self.dtype = dtype
        self.tp_size = distributed.get_tp_size()
        model_cls = get_model_class(getattr(hf_config, "architectures", None))
        assert model_cls is not None, "the engine picks the transformers fallback for unknown architectures"
        with torch.device(device):
            self.model = model_cls(hf_config, dtype=dtype)
        load_weights(self.model, model_dir, config.load_format)
        quantize_model(self.model, config.quantize)
        if device.type == "cpu":
            pack_model_for_cpu(self.model)
        self.model.eval()
        self.weight_bytes = sum({p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}.values())
        logger.info("rank %d/%d holds %.1f MiB of weights", distributed.get_tp_rank(), self.tp_size,
                    self.weight_bytes / 2**20)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        # decode reads the paged pool in place on CPU when the native kernel builds here
        self.use_paged_kernel = (device.type == "cpu"
                                 and self.attention_layers[0].head_dim in kernels.SUPPORTED_HEAD_DIMS
                                 and kernels.load_cpu_kernels())
        self.block_size = config.block_size
        self.block_offsets = torch.arange(self.block_size, device=device)
        self.num_blocks = self._num_kv_blocks(hf_config)
        self._allocate_kv_cache()
        self.sampler = Sampler()

    def _num_kv_blocks(self, hf_config) -> int:
        first = self.attention_layers[0]
        per_token = kv_bytes_per_token(hf_config, first.num_kv_heads, first.head_dim, self.dtype)
        if self.config.max_batch_total_tokens is not None:
            tokens = self.config.max_batch_total_tokens
        else:
            fraction = self.config.kv_cache_memory_fraction
            if self.device.type == "cpu":
                # the host runs everything else too: never take more than a quarter of free RAM
                fraction = min(fraction, 0.25) / self.tp_size
            tokens = int(available_memory(self.device) * fraction) // per_token
            # more than every slot of a full batch at max length is wasted memory
            tokens = min(tokens, self.config.max_batch_size * self.config.max_total_tokens)
        num_blocks = tokens // self.block_size
        if self.tp_size > 1:
            # every rank must hold the same blocks: the smallest cache wins
            num_blocks = distributed.all_reduce_min_cpu(num_blocks)
        if num_blocks * self.block_size < self.config.max_total_tokens:
            raise ValueError(
                f"the KV cache holds {num_blocks * self.block_size} tokens, less than one request of "
                f"`max_total_tokens` ({self.config.max_total_tokens}); raise --max-batch-total-tokens"
            )
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                    num_blocks * self.block_size * per_token / 2**20)
        return num_blocks

    def _allocate_kv_cache(self) -> None:
        num_slots = self.num_blocks * self.block_size
        for layer in self.attention_layers:
            shape = (num_slots, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Rank 0: flatten the step into one int64 tensor, broadcast it at tp > 1, and unpack it."""
        # decodes (one new token, or one plus drafts) first: they share one batched attention call
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1 or s.draft_token_ids]
        prefills = [s for s in out.scheduled if s.num_new_tokens > 1 and not s.draft_token_ids]
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sampling_order: list[ScheduledRequest] = []
        context_lens: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[PromptTarget] = []
        decode_block_ids: list[list[int]] = []
        for s in decodes:
            req = s.request
            pos = req.num_computed_tokens
            # a one-token prompt chunk (the budget's last token) rides with the decodes
            if (target := prompt_target(req, pos, pos + 1)) is not None:
                prompt_rows.append(len(input_ids))
                prompt_targets.append(target)
            if s.is_sampling:
                sampling_order.append(s)
            # each draft is a decode row of its own, seeing the context up to itself
            for i, token_id in enumerate([req.token_ids[pos], *s.draft_token_ids]):
                if s.is_sampling:
                    sample_rows.append(len(input_ids))
                input_ids.append(token_id)
                positions.append(pos + i)
                context_lens.append(pos + i + 1)
                decode_block_ids.append(req.block_ids)
        max_len = max(context_lens, default=0)
        max_blocks = -(-max_len // bs)
        tables: list[int] = []
        for block_ids in decode_block_ids:
            blocks = block_ids[:max_blocks]
            tables += blocks
            tables += [0] * (max_blocks - len(blocks))
        begins: list[int] = []
        ends: list[int] = []
        for s in prefills:
            req = s.request
            begin, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            if (target := prompt_target(req, begin, end)) is not None:
                prompt_rows.extend(range(len(input_ids), len(input_ids) + len(target[2])))
                prompt_targets.append(target)
            input_ids.extend(req.token_ids[begin:end])
            positions.extend(range(begin, end))
            begins.append(begin)
            ends.append(end)
            tables += req.block_ids[:-(-end // bs)]
            if s.is_sampling:
                sample_rows.append(len(input_ids) - 1)
                sampling_order.append(s)
        payload = input_ids + positions + sample_rows + context_lens + begins + ends + tables + prompt_rows
        header = [1, len(input_ids), len(context_lens), max_blocks, len(prefills), len(sample_rows), max_len,
                  len(payload), len(prompt_rows)]
        payload_t = torch.tensor(payload, dtype=torch.long)
        if self.tp_size > 1:
            distributed.broadcast_cpu(torch.tensor(header, dtype=torch.long))
            distributed.broadcast_cpu(payload_t)
        inputs = self._unpack(header, payload_t)
        inputs.sampling_order = sampling_order
        inputs.prompt_targets = prompt_targets
        return inputs

    def receive(self) -> StepInputs | None:
        """Rank > 0: the next step from rank 0, or None when rank 0 shuts down."""
        header = distributed.broadcast_cpu(torch.empty(HEADER_SIZE, dtype=torch.long)).tolist()
        if header[0] == 0:
            return None
        return self._unpack(header, distributed.broadcast_cpu(torch.empty(header[7], dtype=torch.long)))

    def _unpack(self, header: list[int], payload: torch.Tensor) -> StepInputs:
        # payload: [input_ids T | positions T | sample rows S | decode context lens B | prefill begins P |
        #           prefill ends P | decode block tables B*max_blocks | each prefill's blocks | prompt rows R]
        _, num_tokens, num_decodes, max_blocks, num_prefills, num_samples, max_len, _, num_prompt_rows = header
        bs = self.block_size
        t = payload.to(self.device, non_blocking=True)
        o = 2 * num_tokens + num_samples
        lens = t[o:o + num_decodes]
        o += num_decodes
        begins = payload[o:o + num_prefills].tolist()
        ends = payload[o + num_prefills:o + 2 * num_prefills].tolist()
        o += 2 * num_prefills
        meta = AttentionMetadata(slot_mapping=t[:0], num_decode_tokens=num_decodes)
        slots = []
        if num_decodes:
            table = t[o:o + num_decodes * max_blocks].view(num_decodes, max_blocks)
            o += num_decodes * max_blocks
            last = lens - 1
            slots.append(table[torch.arange(num_decodes, device=self.device), last // bs] * bs + last % bs)
            if self.use_paged_kernel:
                meta.decode_block_tables, meta.decode_context_lens, meta.block_size = table, lens, bs
            else:
                gather = (table[:, :, None] * bs + self.block_offsets).view(num_decodes, -1)[:, :max_len]
                mask = torch.arange(max_len, device=self.device)[None, :] < lens[:, None]
                meta.decode_gather_index = gather
                meta.decode_mask = mask.view(num_decodes, 1, 1, max_len)
        starts = [0]
        for begin, end in zip(begins, ends, strict=True):
            num_blocks = -(-end // bs)
            context_slots = (t[o:o + num_blocks, None] * bs + self.block_offsets).view(-1)[:end]
            o += num_blocks
            slots.append(context_slots[begin:])
            starts.append(starts[-1] + end - begin)
            meta.prefill_context_lens.append(end)
            meta.prefill_gather_index.append(context_slots if begin > 0 else None)
        meta.prefill_starts = starts
        meta.slot_mapping = torch.cat(slots) if len(slots) > 1 else slots[0] if slots else t[:0]
        return StepInputs(
            input_ids=t[:num_tokens],
            positions=t[num_tokens:2 * num_tokens],
            meta=meta,
            sample_indices=t[2 * num_tokens:2 * num_tokens + num_samples],
            sampling_order=[],
            prompt_rows=t[t.shape[0] - num_prompt_rows:] if num_prompt_rows else None,
        )

    def forward(self, inputs: StepInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every rank: the model over this rank's shard; logits [N, vocab] for the sampling rows, and
        [R, vocab] for the prompt rows whose log-probabilities were asked for."""
        with forward_context(inputs.meta):
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
        inputs = self.prepare(out)
        logits, prompt_logits = self.forward(inputs)
        prompt_logprobs = score_prompt_tokens(prompt_logits, inputs.prompt_targets or [])
        if logits is None:
            return [], None, prompt_logprobs
        order = inputs.sampling_order
        return order, self.sampler(logits.float(), sampling_rows(order, rows)), prompt_logprobs

    def shutdown(self) -> None:
        """Rank 0: tell the workers to stop, join them and leave the process group."""
        if self.tp_size > 1:
            header = torch.zeros(HEADER_SIZE, dtype=torch.long)
            distributed.broadcast_cpu(header)
            distributed.shutdown()
            self.tp_size = 1

    def release(self, request_id: str) -> None:
        """Paged runners keep nothing per request; the fallback runner drops its cache here."""


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


def prompt_target(request, begin: int, end: int) -> PromptTarget | None:
    """What a chunk of positions [begin, end) scores when the request asked for prompt log-probabilities:
    position j's logits score prompt token j + 1 (the last prompt position's logits sample instead)."""
    if not request.sampling_params.prompt_logprobs:  # every decode row asks, every step: answer cheaply
        return None
    scored_end = min(end, request.num_prompt_tokens - 1)
    if begin >= scored_end:
        return None
    return (request.request_id, begin + 1, request.token_ids[begin + 1:scored_end + 1],
            request.sampling_params.top_n_tokens)


def score_prompt_tokens(logits: torch.Tensor | None, targets: list[PromptTarget]) -> dict[str, PromptScores]:
    """Log-probability of each scored prompt token (and its top-n alternatives when asked), per request."""
    if logits is None:
        return {}
    token_ids = torch.tensor([t for _, _, ids, _ in targets for t in ids], device=logits.device)
    max_top = max(top_n for *_, top_n in targets)
    values: list[float] = []
    tops: list[list[tuple[int, float]]] = []
    for start in range(0, logits.shape[0], SCORE_ROWS):
        rows = logits[start:start + SCORE_ROWS].float()
        lse = rows.logsumexp(-1)
        values += (rows.gather(1, token_ids[start:start + SCORE_ROWS, None]).squeeze(1) - lse).tolist()
        if max_top:
            top_values, top_ids = rows.topk(max_top, dim=-1)
            top_values = (top_values - lse[:, None]).tolist()
            tops += [list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_values, strict=True)]
    scored, offset = {}, 0
    for request_id, first, ids, top_n in targets:
        alternatives = [t[:top_n] for t in tops[offset:offset + len(ids)]] if top_n else []
        scored[request_id] = (first, values[offset:offset + len(ids)], alternatives)
        offset += len(ids)
    return scored


def configure_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
