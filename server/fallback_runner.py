"""Runner for architectures without a native model: transformers forward, one request at a time.

The scheduler and block accounting stay the same (so limits, preemption and metrics behave alike);
the K/V themselves live in each request's own transformers cache instead of the paged pool.
"""

from __future__ import annotations

import torch

from genserve.server.config import EngineConfig
from genserve.server.layers.quantization import quantize_model
from genserve.server.model_runner import StepOutput
from genserve.server.models.hf_fallback import TransformersCausalLM
from genserve.server.prompt_scores import PromptScores, prompt_target, score_prompt_tokens
from genserve.server.sampler import Sampler, SamplingRow
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput


class FallbackRunner:
    supports_prefix_caching = False

    def __init__(self, config: EngineConfig, hf_config, model_dir, device: torch.device, dtype: torch.dtype) -> None:
        self.model = TransformersCausalLM(model_dir, dtype=dtype, device=device, load_format=config.load_format)
        quantize_model(self.model, config.quantize)  # raises: only native models can be quantized
        self.block_size = config.block_size
        tokens = config.max_batch_total_tokens or config.max_batch_size * config.max_total_tokens
        self.num_blocks = max(tokens // config.block_size, -(-config.max_total_tokens // config.block_size))
        self.caches: dict[str, object] = {}
        self.sampler = Sampler()

    def execute(self, out: SchedulerOutput, rows: dict[str, SamplingRow]) -> StepOutput:
        order: list[ScheduledRequest] = []
        logits = []
        prompt_logprobs: dict[str, PromptScores] = {}
        for s in out.scheduled:
            req = s.request
            begin, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            past = self.caches.get(req.request_id) if begin > 0 else None
            target = prompt_target(req, begin, end)
            score = target is not None
            chunk_logits, self.caches[req.request_id] = self.model.forward_request(
                req.token_ids[begin:end], past, all_logits=score)
            if score:
                prompt_logprobs.update(score_prompt_tokens(chunk_logits[:len(target[2])], [target]))
            if s.is_sampling:
                order.append(s)
                logits.append(chunk_logits[-1] if score else chunk_logits)
        if not order:
            return [], None, prompt_logprobs
        result = self.sampler(torch.stack(logits), [rows[s.request.request_id] for s in order])
        return order, result, prompt_logprobs

    def release(self, request_id: str) -> None:
        self.caches.pop(request_id, None)
