"""Architectures with a native implementation; anything else falls back to transformers."""

from __future__ import annotations

from genserve.server.models import (
    bart,
    bloom,
    gemma2,
    gemma3,
    gpt2,
    gpt_neox,
    mixtral,
    phi3,
    qwen3,
    qwen3_moe,
    t5,
)
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

# encoder-decoder families: served by paged_seq2seq_runner.py (the decoder-only runner never sees them)
ENCODER_DECODER_REGISTRY: dict[str, type] = {**bart.ARCHITECTURES, **t5.ARCHITECTURES}


def get_encoder_decoder_class(architectures: list[str] | None) -> type | None:
    """The native encoder-decoder class for the first known architecture, or None (transformers serves it)."""
    for arch in architectures or []:
        if arch in ENCODER_DECODER_REGISTRY:
            return ENCODER_DECODER_REGISTRY[arch]
    return None


def get_model_class(architectures: list[str] | None) -> type | None:
    """The native class for the first known architecture, or None (the caller falls back to transformers)."""
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    return None


def native_config(hf_config):
    """The config the native class and the engine read: the text model's, for a multimodal checkpoint whose text
    path is native (the class's `text_config_of`); otherwise `hf_config` itself."""
    adapt = getattr(get_model_class(getattr(hf_config, "architectures", None)), "text_config_of", None)
    return adapt(hf_config) if adapt else hf_config
