"""Gemma 3 (text): Gemma 2's layer with (1 + w) RMSNorms on each q and k head, and a rope per layer type (local
layers: rope_local_base_freq, no scaling; global layers: rope_theta and rope_scaling)."""

from __future__ import annotations

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


ARCHITECTURES = {"Gemma3ForCausalLM": Gemma3ForCausalLM}
