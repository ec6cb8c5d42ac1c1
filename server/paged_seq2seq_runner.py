"""Runner for native encoder-decoder models (models/bart.py, models/t5.py) over the paged KV cache.

Token accounting is the scheduler's, as documented at the top of seq2seq_runner.py: a request's
token_ids are its prompt then its generated tokens, the decoder sequence is [decoder_start_token_id]
+ generated tokens, and a chunk that ends inside the prompt computes nothing. Here:

- the chunk that completes a prompt runs the encoder over it (prompts completing in the same step
  together, one flat forward), and each decoder layer's cross-attention K/V of it are computed once
  and kept per request (`self.cross`) until it finishes, is aborted or preempted (a preempted request
  recomputes them when it runs again);
- decoder position d's self-attention K/V sit in the slot of token index d of the request's block
  table (d <= generated tokens < the tokens the scheduler allocated), so decode rows read the pool
  through the same block tables and attention backends the decoder-only models use. The prompt's share
  of the allocated blocks is what the cross-attention K/V cost, held outside the pool;
- one decoder forward covers every request of the step: decode rows first, then chunks (a starting
  request's [start token, recomputed generated tokens...]).
"""

from __future__ import annotations

import logging

import torch

from genserve.server import quant_methods
from genserve.server.config import EngineConfig
from genserve.server.layers.attention import (
    Attention,
    AttentionMetadata,
    choose_decode_backend,
    forward_context,
    set_decode_metadata,
)
from genserve.server.layers.cpu_packing import pack_model_for_cpu
from genserve.server.model_runner import StepOutput, available_memory
from genserve.server.models import get_encoder_decoder_class
from genserve.server.models.encoder_decoder import CrossBatch, CrossKV, pad_decode_rows
from genserve.server.prompt_scores import PromptScores
from genserve.server.sampler import Sampler, SamplingRow
from genserve.server.scheduler import SchedulerOutput
from genserve.server.seq2seq_runner import decoder_row

logger = logging.getLogger(__name__)


def checkpoint_has_lm_head(model_dir, load_format: str) -> bool:
    """Whether the checkpoint brings its own LM head (an untied T5 v1.1 / Flan head, or BART's copy)."""
    from pathlib import Path

    from safetensors import safe_open

    if load_format == "dummy":
        return False
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if "lm_head.weight" in f.keys():
                return True
    return False


class PagedSeq2SeqRunner:
    supports_prefix_caching = False  # the encoder reads the whole prompt: no prefix of it stands alone
    model_path_kind = "native"
    kv_sliding_window = None

    def __init__(self, config: EngineConfig, hf_config, model_dir, device: torch.device, dtype: torch.dtype) -> None:
        from genserve.server.loader import load_weights

        architectures = getattr(hf_config, "architectures", None)
        if config.speculate:
            raise ValueError(f"--speculate needs a decoder-only native model; {architectures} is encoder-decoder")
        if config.num_shard > 1:
            raise ValueError(f"--num-shard > 1 needs a decoder-only native model; encoder-decoder {architectures} "
                             "runs on one device")
        if config.quantize:  # refused before any weight loads
            quant_methods.check_method(config.quantize)
            raise ValueError(f"`--quantize {config.quantize}` needs a decoder-only native model; encoder-decoder "
                             f"{architectures} is served unquantized")
        if config.kv_cache_dtype not in (None, "", "auto"):
            raise ValueError(f"--kv-cache-dtype {config.kv_cache_dtype} needs a decoder-only native model")
        self.config, self.device, self.dtype = config, device, dtype
        model_cls = get_encoder_decoder_class(architectures)
        with torch.device(device):
            self.model = model_cls(hf_config, dtype=dtype,
                                   has_lm_head=checkpoint_has_lm_head(model_dir, config.load_format))
        load_weights(self.model, model_dir, config.load_format)
        if device.type == "cpu":
            pack_model_for_cpu(self.model)
        self.model.eval()
        self.decoder_start_token_id = self._start_token(hf_config, model_dir)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        first = self.attention_layers[0]
        self.block_size = config.block_size
        if self.model.needs_score_bias:  # neither the native kernel nor FlashAttention adds a score bias
            self.decode_backend, self.decode_flash = "gather", False
        else:
            self.decode_backend, self.decode_flash = choose_decode_backend(device, dtype, first.head_dim,
                                                                           self.block_size)
        self.num_blocks = self._num_kv_blocks()
        num_slots = (self.num_blocks + 1) * self.block_size  # + a scratch block, as ModelRunner keeps
        for layer in self.attention_layers:
            shape = (num_slots, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.cross: dict[str, CrossKV] = {}  # request id -> its cross-attention K/V, per decoder layer
        self._padded: tuple[tuple[str, ...], tuple] | None = None  # the last step's decode rows, padded
        self.sampler = Sampler()
        logger.info("native encoder-decoder %s: decode attention %s; KV cache %d blocks of %d tokens",
                    type(self.model).__name__, self.decode_backend, self.num_blocks, self.block_size)

    @staticmethod
    def _start_token(hf_config, model_dir) -> int:
        start = getattr(hf_config, "decoder_start_token_id", None)
        if start is None:
            from transformers import GenerationConfig

            try:
                start = GenerationConfig.from_pretrained(model_dir).decoder_start_token_id
            except OSError:
                start = None
        if start is None:
            raise ValueError(f"{getattr(hf_config, 'architectures', None)}: the config sets no decoder_start_token_id")
        return int(start)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        per_token = sum(2 * layer.num_kv_heads * layer.head_dim for layer in self.attention_layers)
        per_token *= torch.finfo(self.dtype).bits // 8
        if cfg.max_batch_total_tokens is not None:
            tokens = cfg.max_batch_total_tokens
        else:
            fraction = min(cfg.kv_cache_memory_fraction, 0.25) if self.device.type == "cpu" \
                else cfg.kv_cache_memory_fraction
            # a counted token costs a pool slot, and a prompt token its cross-attention K/V as well
            tokens = int(available_memory(self.device) * fraction) // (2 * per_token)
            tokens = min(tokens, cfg.max_batch_size * cfg.max_total_tokens)
        # at least one request of max_total_tokens, as the transformers runner holds
        return max(tokens // self.block_size, -(-cfg.max_total_tokens // self.block_size))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepOutput:
        decodes, chunks, starting = [], [], []
        for s in out.scheduled:
            request = s.request
            num_prompt, begin = request.num_prompt_tokens, request.num_computed_tokens
            end = begin + s.num_new_tokens
            if end < num_prompt:
                continue  # the encoder waits for the whole prompt
            if begin < num_prompt:
                starting.append(request)
                chunks.append((s, [self.decoder_start_token_id, *request.token_ids[num_prompt:end]], 0))
            elif end - begin == 1:
                decodes.append((s, request.token_ids[begin:end], begin - num_prompt + 1))
            else:
                chunks.append((s, request.token_ids[begin:end], begin - num_prompt + 1))
        if starting:
            for request, kv in zip(starting, self.model.encode([r.prompt_token_ids for r in starting]), strict=True):
                self.cross[request.request_id] = kv
        order = [s for s in out.scheduled if s.is_sampling]
        prompt_logprobs: dict[str, PromptScores] = {}  # the decoder never reads the prompt: nothing to score
        if not decodes and not chunks:
            return [], None, prompt_logprobs
        entries = decodes + chunks
        meta, input_ids, positions = self._metadata(decodes, chunks)
        cross = self._cross_batch(decodes, chunks)
        with forward_context(meta):
            hidden = self.model.decode(input_ids, positions, cross)
        if not order:
            return [], None, prompt_logprobs
        last_row, row = {}, 0
        for s, tokens, _ in entries:
            row += len(tokens)
            last_row[s.request.request_id] = row - 1
        index = torch.tensor([last_row[s.request.request_id] for s in order], device=self.device)
        logits = self.model.compute_logits(hidden[index]).float()
        sampling = [decoder_row(rows[s.request.request_id], s.request, self.decoder_start_token_id) for s in order]
        return order, self.sampler(logits, sampling), prompt_logprobs

    def _slots(self, request, first: int, end: int) -> list[int]:
        bs, blocks = self.block_size, request.block_ids
        return [blocks[d // bs] * bs + d % bs for d in range(first, end)]

    def _metadata(self, decodes, chunks) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
        device, bs = self.device, self.block_size
        ids, positions, slots = [], [], []
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(decodes))
        if decodes:
            lens = [first + 1 for _, _, first in decodes]
            width = -(-max(lens) // bs)
            tables = [s.request.block_ids[:width] + [0] * (width - len(s.request.block_ids[:width]))
                      for s, _, _ in decodes]
            for (s, tokens, first), length in zip(decodes, lens, strict=True):
                ids += tokens
                positions.append(first)
                slots += self._slots(s.request, first, length)
            set_decode_metadata(meta, self.decode_backend, torch.tensor(tables, device=device),
                                torch.tensor(lens, device=device), bs, max(lens), lens, self.decode_flash)
        starts = [0]
        for s, tokens, first in chunks:
            end = first + len(tokens)
            ids += tokens
            positions += range(first, end)
            context = torch.tensor(self._slots(s.request, 0, end), device=device)
            slots += context[first:].tolist()
            starts.append(starts[-1] + len(tokens))
            meta.prefill_context_lens.append(end)
            meta.prefill_gather_index.append(context if first > 0 else None)
        meta.prefill_starts = starts
        meta.slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        return meta, torch.tensor(ids, device=device), torch.tensor(positions, device=device)

    def _cross_batch(self, decodes, chunks) -> CrossBatch:
        decode_kv, mask = [], None
        if decodes:
            ids = tuple(s.request.request_id for s, _, _ in decodes)
            if self._padded is None or self._padded[0] != ids:  # a new batch of decode rows: pad it once
                self._padded = (ids, pad_decode_rows([self.cross[i] for i in ids]))
            decode_kv, mask = self._padded[1]
        starts = [0]
        for _, tokens, _ in chunks:
            starts.append(starts[-1] + len(tokens))
        return CrossBatch(len(decodes), decode_kv, mask, [self.cross[s.request.request_id] for s, _, _ in chunks],
                          starts)

    def release(self, request_id: str) -> None:
        self.cross.pop(request_id, None)
        if self._padded is not None and request_id in self._padded[0]:
            self._padded = None
