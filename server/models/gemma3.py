"""Gemma 3 (text): Gemma 2's layer with (1 + w) RMSNorms on each q and k head, and a rope per layer type (local
layers: rope_local_base_freq, no scaling; global layers: rope_theta and rope_scaling).

The multimodal checkpoints (gemma-3-4b/12b/27b-it, `Gemma3ForConditionalGeneration`) serve their text path with
the same model: the config's `text_config`, the language model's tensors under their prefix, and the vision tower
and projector never read (requests with images are refused at the API)."""

from __future__ import annotations

import copy

from torch import nn

from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import CausalLM, head_dim_of
from genserve.server.models.gemma2 import GEMMA_PACKED_MODULES, GemmaModel


def rope_per_layer_type(config) -> dict[str, dict]:
    params = config.rope_parameters
    if "full_attention" in params or "sliding_attention" in params:
        return params
    # a flat set (older configs): global layers use it, local layers only its base frequency
    local = {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    return {"full_attention": params, "sliding_attention": local}


class Gemma3ForCausalLM(CausalLM):
    packed_modules_mapping = GEMMA_PACKED_MODULES

    def build_body(self, config) -> nn.Module:
        params = rope_per_layer_type(config)
        layer_types = config.layer_types
        rotary = {kind: RotaryEmbedding(config, head_dim_of(config), params=params[kind]) for kind in set(layer_types)}
        return GemmaModel(config, lambda layer_idx: rotary[layer_types[layer_idx]], qk_norm=True)


# checkpoint prefix -> ours: transformers < 4.52 saved (and v5 saves again) `language_model.model.*`,
# 4.52 to 4.57 `model.language_model.*` with the head at the top
TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def text_config_of(config):
    """The text model's config as the whole engine reads it (layers, heads, vocabulary, limits); it keeps the
    checkpoint's architecture, and its dtype and tying, which transformers reads from the outer config."""
    if not hasattr(config, "text_config"):
        return config
    text = copy.deepcopy(config.get_text_config(decoder=True))
    text.architectures = list(config.architectures or [])
    text.tie_word_embeddings = getattr(config, "tie_word_embeddings", text.tie_word_embeddings)
    if getattr(text, "dtype", None) is None:
        text.dtype = getattr(config, "dtype", None)
    return text


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """Text-only serving of a multimodal Gemma 3 checkpoint."""

    def __init__(self, config, dtype=None) -> None:
        super().__init__(text_config_of(config), dtype)

    @staticmethod
    def text_config_of(config):
        return text_config_of(config)

    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith(VISION_PREFIXES):
            return None  # skipped before its data is read: the loader hands over lazy safetensors slices
        for prefix, ours in TEXT_PREFIXES:
            if name.startswith(prefix):
                return ours + name[len(prefix):]
        return name


ARCHITECTURES = {"Gemma3ForCausalLM": Gemma3ForCausalLM,
                 "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration}
