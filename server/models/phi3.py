"""Phi-3 / Phi-3.5 / Phi-4 (Phi3ForCausalLM): Llama's layer with q|k|v and gate|up fused in the checkpoint,
LongRoPE (short and long factors), partial rotary (Phi-4-mini) and one sliding window on every layer."""

from __future__ import annotations

from torch import nn

from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import (
    CausalLM,
    PreNormDecoderLayer,
    PreNormModel,
    head_dim_of,
    layer_sliding_window,
    load_fused,
)
from genserve.server.models.llama import LlamaAttention, LlamaMLP


def phi3_layer(config, layer_idx: int, rotary_emb: RotaryEmbedding) -> PreNormDecoderLayer:
    """Llama's layer (no biases), its fused q|k|v and gate|up checkpoint tensors loaded shard by shard."""
    head_dim = head_dim_of(config)
    attention = LlamaAttention(config, rotary_emb, layer_sliding_window(config, layer_idx))
    load_fused(attention.qkv_proj.weight, [("q", config.num_attention_heads * head_dim),
                                           ("k", config.num_key_value_heads * head_dim),
                                           ("v", config.num_key_value_heads * head_dim)])
    mlp = LlamaMLP(config)
    load_fused(mlp.gate_up_proj.weight, [(0, config.intermediate_size), (1, config.intermediate_size)])
    return PreNormDecoderLayer(config, attention, mlp)


class Phi3ForCausalLM(CausalLM):
    def build_body(self, config) -> nn.Module:
        return PreNormModel(config, phi3_layer)


ARCHITECTURES = {"Phi3ForCausalLM": Phi3ForCausalLM}
