"""Gemma 2: (1 + w) RMSNorms before and after both attention and MLP, GeGLU (tanh gelu), embeddings scaled by
sqrt(hidden), query_pre_attn_scalar for the attention scale, attention and final logit soft-capping, sliding-window
and global layers alternating. Gemma 3 (gemma3.py) is the same layer with q/k norms and a rope per layer type."""

from __future__ import annotations

import torch
from torch import nn

from genserve.server.layers.activation import gated_activation
from genserve.server.layers.attention import Attention
from genserve.server.layers.embedding import VocabParallelEmbedding
from genserve.server.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from genserve.server.layers.norm import GemmaRMSNorm
from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import CausalLM, head_dim_of, layer_sliding_window
from genserve.server.models.qwen3 import norm_heads


def hidden_activation(config) -> str:
    return getattr(config, "hidden_activation", None) or config.hidden_act


class GemmaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, qk_norm: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim = head_dim_of(config)
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=bias)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        if qk_norm:
            self.q_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim,
                                    config.query_pre_attn_scalar**-0.5,
                                    sliding_window=layer_sliding_window(config, layer_idx),
                                    # Gemma 3 has no attention soft-capping (transformers ignores the field there)
                                    logit_softcap=None if qk_norm else getattr(config, "attn_logit_softcapping", None))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if not self.qk_norm:
            self.rotary_emb(positions, qkv[:, :self.q_size + self.kv_size])
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return self.o_proj(self.attn(q, k, v))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = norm_heads(self.q_norm, q, self.head_dim), norm_heads(self.k_norm, k, self.head_dim)
        self.rotary_emb(positions, q)
        self.rotary_emb(positions, k)
        return self.o_proj(self.attn(q, k, v))


class GemmaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act_fn = gated_activation(hidden_activation(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, qk_norm: bool = False) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = GemmaAttention(config, layer_idx, rotary_emb, qk_norm)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    """`rotary_for_layer(layer_idx)` gives each layer its rotary (shared objects, so cos/sin are cached once)."""

    def __init__(self, config, rotary_for_layer, qk_norm: bool = False) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # HF rounds sqrt(hidden) to the model dtype before scaling
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i, rotary_for_layer(i), qk_norm)
                                    for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def embedding(self) -> VocabParallelEmbedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        hidden, residual = hidden * self.embed_scale.to(hidden.dtype), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


GEMMA_PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Gemma2ForCausalLM(CausalLM):
    packed_modules_mapping = GEMMA_PACKED_MODULES

    def build_body(self, config) -> nn.Module:
        rotary_emb = RotaryEmbedding(config, head_dim_of(config))
        return GemmaModel(config, lambda layer_idx: rotary_emb)


ARCHITECTURES = {"Gemma2ForCausalLM": Gemma2ForCausalLM}
