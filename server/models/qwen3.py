"""Qwen3: Llama's layout with an RMSNorm over each q and k head before rotary, and per-layer sliding windows.

`qwen3_body` takes the MLP as a part (`make_mlp(config, layer_idx)`), so Qwen3-MoE reuses it with its sparse
block."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from genserve.server.layers.attention import Attention
from genserve.server.layers.linear import QKVParallelLinear, RowParallelLinear
from genserve.server.layers.norm import RMSNorm
from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import (
    CausalLM,
    PreNormDecoderLayer,
    PreNormModel,
    head_dim_of,
    layer_sliding_window,
)
from genserve.server.models.llama import LlamaMLP


def norm_heads(norm: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x: [T, heads * head_dim] -> the same with every head normalized on its own (a contiguous copy)."""
    return norm(x.reshape(-1, head_dim)).view(x.shape[0], -1)


class Qwen3Attention(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.head_dim = head_dim = head_dim_of(config)
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=bias)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5,
                                    sliding_window=layer_sliding_window(config, layer_idx))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = norm_heads(self.q_norm, q, self.head_dim), norm_heads(self.k_norm, k, self.head_dim)
        self.rotary_emb(positions, q)
        self.rotary_emb(positions, k)
        return self.o_proj(self.attn(q, k, v))


def dense_mlp(config, layer_idx: int) -> nn.Module:
    return LlamaMLP(config)


def qwen3_body(config, make_mlp: Callable[[object, int], nn.Module] = dense_mlp) -> PreNormModel:
    """Llama's layer stack with Qwen3's attention; `make_mlp(config, layer_idx)` builds each layer's MLP."""
    def make_layer(config, layer_idx: int, rotary_emb: RotaryEmbedding) -> PreNormDecoderLayer:
        return PreNormDecoderLayer(config, Qwen3Attention(config, layer_idx, rotary_emb), make_mlp(config, layer_idx))

    return PreNormModel(config, make_layer)


class Qwen3ForCausalLM(CausalLM):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def build_body(self, config) -> nn.Module:
        return qwen3_body(config)


ARCHITECTURES = {"Qwen3ForCausalLM": Qwen3ForCausalLM}
