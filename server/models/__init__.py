"""Architectures with a native implementation; anything else falls back to transformers."""

from __future__ import annotations

from genserve.server.models import bloom, gemma2, gemma3, gpt2, gpt_neox, mixtral, phi3, qwen3, qwen3_moe
from genserve.server.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    **qwen3.ARCHITECTURES,
    **gemma2.ARCHITECTURES,
    **gemma3.ARCHITECTURES,
    **phi3.ARCHITECTURES,
    **gpt2.ARCHITECTURES,
    **gpt_neox.ARCHITECTURES,
    **bloom.ARCHITECTURES,
    **mixtral.ARCHITECTURES,
    **qwen3_moe.ARCHITECTURES,
}


def get_model_class(architectures: list[str] | None) -> type | None:
    """The native class for the first known architecture, or None (the caller falls back to transformers)."""
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    return None
