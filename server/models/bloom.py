"""BLOOM: ALiBi instead of positions, LayerNorm (also on the embeddings), q|k|v fused per head in the checkpoint,
tanh gelu MLP, LM head tied to the embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from genserve.server.distributed import get_tp_rank, get_tp_size
from genserve.server.layers.activation import Activation
from genserve.server.layers.attention import Attention
from genserve.server.layers.embedding import VocabParallelEmbedding
from genserve.server.layers.linear import ColumnParallelLinear, RowParallelLinear
from genserve.server.layers.norm import LayerNorm
from genserve.server.models.common import CausalLM, add_prefix
from genserve.server.models.gpt_neox import split_heads_qkv


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes (Press et al.), the extra heads of a non-power-of-2 count interleaved, as BLOOM."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base**i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base**i for i in range(1, 2 * min(closest, num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class BloomAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // heads
        self.query_key_value = ColumnParallelLinear(hidden, 3 * hidden, bias=True)
        self.dense = RowParallelLinear(hidden, hidden, bias=True)
        self.num_heads = heads // get_tp_size()
        first = get_tp_rank() * self.num_heads
        slopes = alibi_slopes(heads)[first:first + self.num_heads]
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5,
                                    alibi_slopes=slopes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads_qkv(self.query_key_value(hidden), self.num_heads, self.head_dim).chunk(3, dim=-1)
        return self.dense(self.attn(q, k, v))


class BloomMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, 4 * config.hidden_size, bias=True)
        self.dense_4h_to_h = RowParallelLinear(4 * config.hidden_size, config.hidden_size, bias=True)
        self.act = Activation("bloom_gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.residual_after_norm = config.apply_residual_connection_post_layernorm
        self.input_layernorm = LayerNorm(config.hidden_size, eps)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps)
        self.mlp = BloomMLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        hidden = self.self_attention(normed) + (normed if self.residual_after_norm else hidden)
        normed = self.post_attention_layernorm(hidden)
        return self.mlp(normed) + (normed if self.residual_after_norm else hidden)


class BloomModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def embedding(self) -> VocabParallelEmbedding:
        return self.word_embeddings

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            hidden = block(hidden)
        return self.ln_f(hidden)


class BloomForCausalLM(CausalLM):
    body_name = "transformer"

    def build_body(self, config) -> nn.Module:
        return BloomModel(config)

    def checkpoint_name(self, name: str) -> str | None:
        return add_prefix(name, "transformer.")


ARCHITECTURES = {"BloomForCausalLM": BloomForCausalLM}
