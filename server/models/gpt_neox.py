"""GPT-NeoX (Pythia, GPT-NeoX-20B): LayerNorm, partial rotary (rotary_pct), q|k|v fused per head in the checkpoint,
parallel residual (attention and MLP both read the layer input) or sequential, untied `embed_out` head."""

from __future__ import annotations

import torch
from torch import nn

from genserve.server.layers.activation import Activation
from genserve.server.layers.attention import Attention
from genserve.server.layers.embedding import VocabParallelEmbedding
from genserve.server.layers.linear import ColumnParallelLinear, RowParallelLinear
from genserve.server.layers.norm import LayerNorm
from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import CausalLM

# causal-mask buffers that older checkpoints saved beside the weights
MASK_BUFFERS = (".attention.bias", ".attention.masked_bias")


def split_heads_qkv(qkv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[T, heads * (q|k|v) * D], the per-head layout of NeoX and BLOOM checkpoints -> [T, q | k | v]."""
    return qkv.view(qkv.shape[0], num_heads, 3, head_dim).transpose(1, 2).reshape(qkv.shape[0], -1)


class GPTNeoXAttention(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // heads
        bias = getattr(config, "attention_bias", True)
        # rows grouped by head: a contiguous block of rows is a block of whole heads, so plain column sharding works
        self.query_key_value = ColumnParallelLinear(hidden, 3 * hidden, bias=bias)
        self.dense = RowParallelLinear(hidden, hidden, bias=bias)
        self.num_heads = self.query_key_value.output_size // (3 * self.head_dim)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = split_heads_qkv(self.query_key_value(hidden), self.num_heads, self.head_dim)
        size = self.num_heads * self.head_dim
        self.rotary_emb(positions, qkv[:, :2 * size])
        q, k, v = qkv.split([size] * 3, dim=-1)
        return self.dense(self.attn(q, k, v))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = Activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, rotary_emb)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        attn = self.attention(positions, self.input_layernorm(hidden))
        if self.use_parallel_residual:
            return hidden + attn + self.mlp(self.post_attention_layernorm(hidden))
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GPTNeoXModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(config, config.hidden_size // config.num_attention_heads)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, rotary_emb) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def embedding(self) -> VocabParallelEmbedding:
        return self.embed_in

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_in(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.final_layer_norm(hidden)


class GPTNeoXForCausalLM(CausalLM):
    body_name = "gpt_neox"
    head_name = "embed_out"

    def build_body(self, config) -> nn.Module:
        return GPTNeoXModel(config)

    def checkpoint_name(self, name: str) -> str | None:
        return None if name.endswith(MASK_BUFFERS) else name


ARCHITECTURES = {"GPTNeoXForCausalLM": GPTNeoXForCausalLM}
