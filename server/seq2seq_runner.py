"""Runners for encoder-decoder models (T5, BART): `make_seq2seq_runner` picks the native one
(paged_seq2seq_runner.py: models/bart.py, models/t5.py, decoder self-attention K/V in the paged pool)
for the families and variants it knows, else `Seq2SeqRunner` here: transformers forwards, the encoder
once per request, the decoder batched across requests, its K/V in transformers' cache.

Token accounting stays the scheduler's: a request's token_ids are its prompt (the encoder input)
then its generated tokens, and the KV budget counts both (the cross-attention K/V hold one entry per
prompt token per layer, the self-attention K/V one per generated token). The decoder sequence is
[decoder_start_token_id] + generated tokens, so token_ids[i] (i >= num_prompt_tokens) is decoder
position i - num_prompt_tokens + 1:

- a chunk that ends inside the prompt computes nothing (the encoder is bidirectional: it needs the
  whole prompt); the scheduler still counts it, so chunked prefill and the prefill budget behave alike;
- the chunk that completes the prompt runs the encoder, then the decoder on the start token (and on
  any generated tokens the chunk covers: a preempted request recomputes them);
- later chunks feed the decoder the generated tokens on top of the request's cached K/V.

max_new_tokens, eos and stop sequences count generated tokens only, as TGI's Seq2SeqLM does.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from genserve.server import quant_methods
from genserve.server.config import EngineConfig
from genserve.server.fallback_runner import is_batching_enabled
from genserve.server.model_runner import StepOutput
from genserve.server.models.hf_seq2seq import DecoderRows, TransformersSeq2SeqLM, gather_decoder_rows
from genserve.server.prompt_scores import PromptScores
from genserve.server.sampler import Sampler, SamplingRow
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


def make_seq2seq_runner(config: EngineConfig, hf_config, model_dir, device: torch.device, dtype: torch.dtype):
    """The native runner where a native family serves the config (and --use-transformers-fallback is off)."""
    from genserve.server.models import get_encoder_decoder_class
    from genserve.server.models.encoder_decoder import unsupported_reason

    architectures = getattr(hf_config, "architectures", None)
    if not config.use_transformers_fallback and get_encoder_decoder_class(architectures) is not None:
        reason = unsupported_reason(hf_config)
        if reason is None:
            from genserve.server.paged_seq2seq_runner import PagedSeq2SeqRunner

            return PagedSeq2SeqRunner(config, hf_config, model_dir, device, dtype)
        logger.warning("%s: %s; serving it through transformers", architectures, reason)
    return Seq2SeqRunner(config, hf_config, model_dir, device, dtype)


def decoder_row(row: SamplingRow, request, start_token: int) -> SamplingRow:
    """The repetition penalty reads the decoder's tokens ([start] + generated), as TGI's and transformers'
    do for encoder-decoder models, not the encoder's prompt."""
    if row.params.repetition_penalty == 1.0:
        return row
    return replace(row, token_ids=[start_token, *row.token_ids[request.num_prompt_tokens:]], num_prompt_tokens=1)


def split(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


class Seq2SeqRunner:
    supports_prefix_caching = False  # the encoder reads the whole prompt: no prefix of it stands alone
    model_path_kind = "transformers-seq2seq"

    def __init__(self, config: EngineConfig, hf_config, model_dir, device: torch.device, dtype: torch.dtype) -> None:
        architectures = getattr(hf_config, "architectures", None)
        if config.speculate:
            raise ValueError(f"--speculate needs a decoder-only native model; {architectures} is encoder-decoder")
        if config.num_shard > 1:
            raise ValueError(f"--num-shard > 1 needs a native model; encoder-decoder {architectures} runs on one device")
        if config.quantize:  # refused before any weight loads
            quant_methods.check_method(config.quantize)
            raise ValueError(f"`--quantize {config.quantize}` needs a native model; encoder-decoder {architectures} "
                             "runs through transformers and cannot be quantized")
        self.model = TransformersSeq2SeqLM(model_dir, dtype=dtype, device=device, load_format=config.load_format,
                                           trust_remote_code=config.trust_remote_code)
        self.block_size = config.block_size
        tokens = config.max_batch_total_tokens or config.max_batch_size * config.max_total_tokens
        self.num_blocks = max(tokens // config.block_size, -(-config.max_total_tokens // config.block_size))
        self.max_rows = config.max_batch_size if is_batching_enabled() else 1
        self.homes: dict[str, tuple[DecoderRows, int]] = {}  # request id -> (its batched decoder cache, its row)
        self.sampler = Sampler()
        logger.info("transformers encoder-decoder (%s): up to %d requests per decoder forward",
                    type(self.model.model).__name__, self.max_rows)

    def execute(self, out: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepOutput:
        starting: dict[int, list[tuple[ScheduledRequest, list[int]]]] = {}
        continuing: dict[tuple[int, int], list[tuple[ScheduledRequest, list[int]]]] = {}
        for s in out.scheduled:
            request = s.request
            num_prompt, begin = request.num_prompt_tokens, request.num_computed_tokens
            end = begin + s.num_new_tokens
            if end < num_prompt:
                continue  # the encoder waits for the whole prompt
            if begin < num_prompt:
                chunk = [self.model.decoder_start_token_id, *request.token_ids[num_prompt:end]]
                starting.setdefault(len(chunk), []).append((s, chunk))
            else:
                past = begin - num_prompt + 1
                home = self.homes.get(request.request_id)
                assert home is not None and home[0].lengths[home[1]] == past, "a request's decoder past must be cached"
                # rows of different decoder lengths share a forward only where left padding keeps positions
                key = (0 if self.model.pads_decoder else past, end - begin)
                continuing.setdefault(key, []).append((s, request.token_ids[begin:end]))
        next_logits: dict[str, torch.Tensor] = {}
        for group_rows in starting.values():
            for group in split(group_rows, self.max_rows):
                next_logits.update(self._start(group))
        for group_rows in continuing.values():
            for group in split(group_rows, self.max_rows):
                next_logits.update(self._continue(group))
        order = [s for s in out.scheduled if s.is_sampling]
        prompt_logprobs: dict[str, PromptScores] = {}  # the decoder never reads the prompt: nothing to score
        if not order:
            return [], None, prompt_logprobs
        logits = torch.stack([next_logits[s.request.request_id] for s in order])
        start = self.model.decoder_start_token_id
        return order, self.sampler(logits, [decoder_row(rows[s.request.request_id], s.request, start)
                                            for s in order]), prompt_logprobs

    def _start(self, group: list[tuple[ScheduledRequest, list[int]]]) -> dict[str, torch.Tensor]:
        """Encode the group's prompts, then run the decoder from its start token (cross K/V computed here)."""
        states, mask = self.model.encode([s.request.prompt_token_ids for s, _ in group])
        cache = self.model.new_cache()
        chunks = [chunk for _, chunk in group]
        logits = self.model.decode(chunks, cache, [0] * len(group), states, mask)
        batch = DecoderRows(cache, [s.request.request_id for s, _ in group], states, mask, [0] * len(group))
        return self._keep(group, batch, logits, len(chunks[0]))

    def _continue(self, group: list[tuple[ScheduledRequest, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self._reusable(group)
        if batch is not None:
            group = sorted(group, key=lambda item: self.homes[item[0].request.request_id][1])
        else:
            sources = [self.homes[s.request.request_id] for s, _ in group]
            cache, states, mask = gather_decoder_rows(sources)
            batch = DecoderRows(cache, [s.request.request_id for s, _ in group], states, mask,
                                [rows.lengths[r] for rows, r in sources])
        chunks = [chunk for _, chunk in group]
        logits = self.model.decode(chunks, batch.cache, batch.lengths, batch.encoder_states, batch.encoder_mask)
        return self._keep(group, batch, logits, len(chunks[0]))

    def _reusable(self, group: list[tuple[ScheduledRequest, list[int]]]) -> DecoderRows | None:
        """The earlier batch holding exactly this group's requests: it grows in place, nothing gathered."""
        first = self.homes[group[0][0].request.request_id][0]
        if len(first.request_ids) != len(group):
            return None
        if any(self.homes[s.request.request_id][0] is not first for s, _ in group):
            return None
        return first

    def _keep(self, group, batch: DecoderRows, logits: torch.Tensor, num_new: int) -> dict[str, torch.Tensor]:
        ids = [s.request.request_id for s, _ in group]
        batch.request_ids = ids
        batch.lengths = [length + num_new for length in batch.lengths]
        for row, request_id in enumerate(ids):
            self.homes[request_id] = (batch, row)
        return {request_id: logits[row] for row, request_id in enumerate(ids)}

    def release(self, request_id: str) -> None:
        self.homes.pop(request_id, None)
