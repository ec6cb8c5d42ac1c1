"""Qwen3: Llama's layout with an RMSNorm over each q and k head before rotary, and per-layer sliding windows.

Qwen3Attention, Qwen3DecoderLayer and Qwen3Model take the MLP as a part (`make_mlp(config, layer_idx)`), so
Qwen3-MoE reuses them with its sparse block."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from genserve.server.layers.attention import Attention
from genserve.server.layers.embedding import VocabParallelEmbedding
from genserve.server.layers.linear import QKVParallelLinear, RowParallelLinear
from genserve.server.layers.norm import RMSNorm
from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import CausalLM, layer_sliding_window
from genserve.server.models.llama import LlamaMLP, head_dim_of


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


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_idx, rotary_emb)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3Model(nn.Module):
    def __init__(self, config, make_mlp: Callable[[object, int], nn.Module] = dense_mlp) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(config, head_dim_of(config))
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i, rotary_emb, make_mlp(config, i))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embedding(self) -> VocabParallelEmbedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3ForCausalLM(CausalLM):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def build_body(self, config) -> nn.Module:
        return Qwen3Model(config)


ARCHITECTURES = {"Qwen3ForCausalLM": Qwen3ForCausalLM}
