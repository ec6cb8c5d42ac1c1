"""Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) over a flat ragged batch of tokens, tensor-parallel ready."""

from __future__ import annotations

import torch
from torch import nn

from genserve.server.layers.activation import SiluAndMul
from genserve.server.layers.attention import Attention
from genserve.server.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import (
    CausalLM,
    PreNormDecoderLayer,
    PreNormModel,
    head_dim_of,
    layer_sliding_window,
)


class LlamaAttention(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, sliding_window: int | None = None) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        attention_bias = getattr(config, "attention_bias", False)
        is_qwen2 = config.model_type == "qwen2"  # Qwen2 always has q/k/v bias and never an o_proj bias
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=attention_bias or is_qwen2)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        bias=attention_bias and not is_qwen2)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5,
                              sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        self.rotary_emb(positions, qkv[:, :self.q_size + self.kv_size])
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        assert config.hidden_act == "silu", f"hidden_act {config.hidden_act!r} is not supported"
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


def llama_layer(config, layer_idx: int, rotary_emb: RotaryEmbedding) -> PreNormDecoderLayer:
    attention = LlamaAttention(config, rotary_emb, layer_sliding_window(config, layer_idx))
    return PreNormDecoderLayer(config, attention, LlamaMLP(config))


class LlamaForCausalLM(CausalLM):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def build_body(self, config) -> nn.Module:
        return PreNormModel(config, llama_layer)
