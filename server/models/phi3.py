"""Phi-3 / Phi-3.5 / Phi-4 (Phi3ForCausalLM): Llama's layer with q|k|v and gate|up fused in the checkpoint,
LongRoPE (short and long factors), partial rotary (Phi-4-mini) and one sliding window on every layer."""

from __future__ import annotations

import torch
from torch import nn

from genserve.server.layers.attention import Attention
from genserve.server.layers.embedding import VocabParallelEmbedding
from genserve.server.layers.linear import QKVParallelLinear, RowParallelLinear
from genserve.server.layers.norm import RMSNorm
from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import CausalLM, layer_sliding_window, load_fused
from genserve.server.models.llama import LlamaMLP, head_dim_of


class Phi3Attention(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads)
        load_fused(self.qkv_proj.weight, [("q", heads * head_dim), ("k", kv_heads * head_dim),
                                          ("v", kv_heads * head_dim)])
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5,
                                    sliding_window=layer_sliding_window(config, layer_idx))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        self.rotary_emb(positions, qkv[:, :self.q_size + self.kv_size])
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx, rotary_emb)
        self.mlp = LlamaMLP(config)
        load_fused(self.mlp.gate_up_proj.weight, [(0, config.intermediate_size), (1, config.intermediate_size)])
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


class Phi3Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(config, head_dim_of(config))
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i, rotary_emb) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embedding(self) -> VocabParallelEmbedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Phi3ForCausalLM(CausalLM):
    def build_body(self, config) -> nn.Module:
        return Phi3Model(config)


ARCHITECTURES = {"Phi3ForCausalLM": Phi3ForCausalLM}
