"""Turn a scheduled step into tensors, run the model over the paged KV cache, and sample."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from genserve.server.config import EngineConfig
from genserve.server.layers.attention import Attention, AttentionMetadata, forward_context
from genserve.server.models import get_model_class
from genserve.server.sampler import Sampler, SampleResult, SamplingRow
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [N] row of each sampling request's last token
    sampling_order: list[ScheduledRequest]


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name in ("auto", None):
        if device.type == "cpu":
            return torch.float32
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
        model_cls = get_model_class(getattr(hf_config, "architectures", None))
        assert model_cls is not None, "the engine picks the transformers fallback for unknown architectures"
        with torch.device(device):
            self.model = model_cls(hf_config, dtype=dtype)
        load_weights(self.model, model_dir)
        self.model.eval()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.block_size = config.block_size
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
                fraction = min(fraction, 0.25)
            tokens = int(available_memory(self.device) * fraction) // per_token
            # more than every slot of a full batch at max length is wasted memory
            tokens = min(tokens, self.config.max_batch_size * self.config.max_total_tokens)
        num_blocks = tokens // self.block_size
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
        # decodes (one new token) first: they share one batched attention call
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in out.scheduled if s.num_new_tokens > 1]
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling_order: list[ScheduledRequest] = []
        for s in decodes:
            req = s.request
            pos = req.num_computed_tokens
            input_ids.append(req.token_ids[pos])
            positions.append(pos)
            slots.append(req.block_ids[pos // bs] * bs + pos % bs)
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode_tokens=len(decodes))
        if decodes:
            context_lens = [s.request.num_computed_tokens + 1 for s in decodes]
            max_len = max(context_lens)
            max_blocks = -(-max_len // bs)
            table = torch.tensor([s.request.block_ids[:max_blocks] + [0] * (max_blocks - len(s.request.block_ids[:max_blocks]))
                                  for s in decodes], dtype=torch.long)
            gather = (table[:, :, None] * bs + torch.arange(bs)).view(len(decodes), -1)[:, :max_len]
            lens = torch.tensor(context_lens)
            mask = torch.zeros(len(decodes), max_len, dtype=torch.float32)
            mask.masked_fill_(torch.arange(max_len)[None, :] >= lens[:, None], -math.inf)
            meta.decode_gather_index = gather.to(self.device)
            meta.decode_mask = mask.view(len(decodes), 1, 1, max_len).to(self.device)
        for i, s in enumerate(decodes):
            if s.is_sampling:
                sample_rows.append(i)
                sampling_order.append(s)
        starts = [0]
        for s in prefills:
            req = s.request
            begin, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            row_offset = len(input_ids)
            input_ids.extend(req.token_ids[begin:end])
            positions.extend(range(begin, end))
            table = torch.tensor(req.block_ids, dtype=torch.long)
            pos = torch.arange(0, end)
            context_slots = table[pos // bs] * bs + pos % bs
            slots.extend(context_slots[begin:].tolist())
            starts.append(starts[-1] + s.num_new_tokens)
            meta.prefill_context_lens.append(end)
            meta.prefill_gather_index.append(context_slots.to(self.device) if begin > 0 else None)
            if s.is_sampling:
                sample_rows.append(row_offset + s.num_new_tokens - 1)
                sampling_order.append(s)
        meta.prefill_starts = starts
        meta.slot_mapping = torch.tensor(slots, dtype=torch.long, device=self.device)
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            meta=meta,
            sample_indices=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            sampling_order=sampling_order,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, rows: dict[str, SamplingRow]) -> tuple[list[ScheduledRequest], SampleResult | None]:
        """Run one step; returns the sampling requests in order and their sampled tokens."""
        inputs = self.prepare(out)
        with forward_context(inputs.meta):
            hidden = self.model(inputs.input_ids, inputs.positions)
        if not inputs.sampling_order:
            return [], None
        logits = self.model.compute_logits(hidden[inputs.sample_indices]).float()
        order = inputs.sampling_order
        result = self.sampler(logits, [rows[s.request.request_id] for s in order])
        return order, result

    def release(self, request_id: str) -> None:
        """Paged runners keep nothing per request; the fallback runner drops its cache here."""


def configure_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
