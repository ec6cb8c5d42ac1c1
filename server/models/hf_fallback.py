"""Any causal LM transformers can load, one request at a time with its own DynamicCache (no paged cache)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache


class TransformersCausalLM:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 load_format: str = "auto"):
        if load_format == "dummy":
            # transformers' own random init (normal(0, initializer_range), norms 1), seeded: no weights read
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                         dtype=dtype or torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto")
        self.model = model.to(device).eval()
        self.config = self.model.config
        self.device = torch.device(device)
        # transformers renamed `past_key_values` to `cache` during 5.x
        is_new_name = "cache" in inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if is_new_name else "past_key_values"

    @torch.inference_mode()
    def forward_request(self, token_ids_new: list[int], past: DynamicCache | None,
                        all_logits: bool = False) -> tuple[torch.Tensor, DynamicCache]:
        """Feed a request's not-yet-seen tokens on top of its cache -> (float32 logits, cache): of the last
        token [V], or of every new token [n, V] with `all_logits`.

        Pass past=None for a new (or preempted and recomputed) request.
        """
        if past is None:
            past = DynamicCache(config=self.config)
        input_ids = torch.tensor([token_ids_new], device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=0 if all_logits else 1,
                         **{self.cache_kwarg: past})
        if all_logits:
            return out.logits[0].float(), past
        return out.logits[0, -1].float(), past  # the cache grew in place
