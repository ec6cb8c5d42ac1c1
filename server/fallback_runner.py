"""Runner for architectures without a native model: transformers forwards over padded batches.

The scheduler and block accounting stay the same (so limits, preemption and metrics behave alike);
the K/V live in batched transformers caches (hf_fallback.KVRows) instead of the paged pool.
A step's requests are cut into groups, each one padded forward: the one-token rows (decodes)
together, prompt chunks by similar length (padding costs compute). A group made of exactly the
rows of one earlier batch, all aligned, runs on that cache as is, so steady decoding gathers
nothing; any other group (a request joined, left, or ran a prompt chunk) gathers its rows' past
into a fresh batch.
"""

from __future__ import annotations

import logging
import os

import torch

from genserve.server.config import EngineConfig
from genserve.server.layers.quantization import quantize_model
from genserve.server.model_runner import StepOutput
from genserve.server.models.hf_fallback import KVRows, TransformersCausalLM, gather_rows
from genserve.server.prompt_scores import PromptScores, prompt_target, score_prompt_tokens
from genserve.server.sampler import Sampler, SamplingRow
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)

# "0"/"off": one request per forward (the old path; benchmarks/fallback_throughput.py compares the two)
BATCHING_ENV = "GENSERVE_FALLBACK_BATCHING"
# a prompt chunk joins a group while the padded tokens stay within this factor of the real ones
PAD_SLACK = 1.25


def is_batching_enabled(environ=os.environ) -> bool:
    return environ.get(BATCHING_ENV, "on").strip().lower() not in ("0", "off", "false", "no")


def group_rows(scheduled: list[ScheduledRequest], max_rows: int) -> list[list[ScheduledRequest]]:
    """Split a step into padded forwards: one-token rows together, longer chunks by similar length."""
    if max_rows == 1:
        return [[s] for s in scheduled]
    singles = [s for s in scheduled if s.num_new_tokens == 1]
    groups = [singles[i:i + max_rows] for i in range(0, len(singles), max_rows)]
    current: list[ScheduledRequest] = []
    for s in sorted((s for s in scheduled if s.num_new_tokens > 1), key=lambda s: -s.num_new_tokens):
        if current:
            padded = current[0].num_new_tokens * (len(current) + 1)
            real = sum(c.num_new_tokens for c in current) + s.num_new_tokens
            if len(current) >= max_rows or padded > PAD_SLACK * real:
                groups.append(current)
                current = []
        current.append(s)
    if current:
        groups.append(current)
    return groups


class FallbackRunner:
    supports_prefix_caching = False
    model_path_kind = "transformers"

    def __init__(self, config: EngineConfig, hf_config, model_dir, device: torch.device, dtype: torch.dtype) -> None:
        self.model = TransformersCausalLM(model_dir, dtype=dtype, device=device, load_format=config.load_format,
                                          trust_remote_code=config.trust_remote_code, hf_config=hf_config)
        quantize_model(self.model, config.quantize)  # raises: only native models can be quantized
        self.block_size = config.block_size
        tokens = config.max_batch_total_tokens or config.max_batch_size * config.max_total_tokens
        self.num_blocks = max(tokens // config.block_size, -(-config.max_total_tokens // config.block_size))
        self.is_batching = is_batching_enabled() and self.model.can_batch
        self.max_rows = config.max_batch_size if self.is_batching else 1
        self.homes: dict[str, tuple[KVRows, int]] = {}  # request id -> (its batched cache, its row)
        self.sampler = Sampler()
        logger.info("transformers fallback (%s): %s", type(self.model.model).__name__,
                    f"up to {self.max_rows} requests per forward" if self.is_batching else "one request per forward")

    def execute(self, out: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepOutput:
        prompt_logprobs: dict[str, PromptScores] = {}
        next_logits: dict[str, torch.Tensor] = {}
        for group in group_rows(out.scheduled, self.max_rows):
            next_logits.update(self._run_group(group, prompt_logprobs))
        order = [s for s in out.scheduled if s.is_sampling]
        if not order:
            return [], None, prompt_logprobs
        logits = torch.stack([next_logits[s.request.request_id] for s in order])
        return order, self.sampler(logits, [rows[s.request.request_id] for s in order]), prompt_logprobs

    def _reusable(self, group: list[ScheduledRequest]) -> KVRows | None:
        """The earlier batch holding exactly this group's requests, each at its computed length, if aligned."""
        if not self.is_batching:  # one request per forward: its own cache (layer types from its config)
            request = group[0].request
            if request.num_computed_tokens == 0:
                return KVRows(self.model.new_cache(), [request.request_id], [0], [0])
            assert request.request_id in self.homes, "a request's past must be cached"
            return self.homes[request.request_id][0]
        first = self.homes.get(group[0].request.request_id)
        if first is None or len(first[0].request_ids) != len(group) or not first[0].is_aligned:
            return None
        batch = first[0]
        for s in group:
            home = self.homes.get(s.request.request_id)
            if home is None or home[0] is not batch or batch.lengths[home[1]] != s.request.num_computed_tokens:
                return None
        return batch

    def _run_group(self, group: list[ScheduledRequest],
                   prompt_logprobs: dict[str, PromptScores]) -> dict[str, torch.Tensor]:
        batch = self._reusable(group)
        if batch is not None and len(group) > 1:
            group = sorted(group, key=lambda s: self.homes[s.request.request_id][1])
        begins = [s.request.num_computed_tokens for s in group]
        if batch is not None:
            cache = batch.cache
        else:
            sources = [self.homes.get(s.request.request_id) if begin else None
                       for s, begin in zip(group, begins, strict=True)]
            assert all(src is not None and src[0].lengths[src[1]] == begin
                       for src, begin in zip(sources, begins, strict=True) if begin), "a request's past must be cached"
            cache = gather_rows(sources, begins)
        width = cache.get_seq_length()
        chunks = [s.request.token_ids[b:b + s.num_new_tokens] for s, b in zip(group, begins, strict=True)]
        targets = [prompt_target(s.request, b, b + len(c)) for s, b, c in zip(group, begins, chunks, strict=True)]
        num_new = max(len(c) for c in chunks)
        sampled_lengths = [len(c) for s, c in zip(group, chunks, strict=True) if s.is_sampling]
        keep = 0 if any(targets) else num_new - min(sampled_lengths, default=num_new) + 1
        logits = self.model.forward_batch(chunks, cache, begins, keep)  # [B, keep or num_new, V]
        offset = num_new - logits.shape[1]
        ids = [s.request.request_id for s in group]
        grown = KVRows(cache, ids, [b + len(c) for b, c in zip(begins, chunks, strict=True)],
                       [width + len(c) for c in chunks])
        next_logits = {}
        for row, (s, chunk, target) in enumerate(zip(group, chunks, targets, strict=True)):
            self.homes[ids[row]] = (grown, row)
            if target is not None:
                prompt_logprobs.update(score_prompt_tokens(logits[row, :len(target[2])], [target]))
            if s.is_sampling:
                next_logits[ids[row]] = logits[row, len(chunk) - 1 - offset]
        return next_logits

    def release(self, request_id: str) -> None:
        self.homes.pop(request_id, None)
