"""GPT-2: LayerNorm, learned absolute positions, gelu MLP, q|k|v fused in Conv1D weights stored [in, out]
(loaded transposed, each rank reading only its columns); the LM head is tied to the token embedding."""

from __future__ import annotations

import torch
from torch import nn

from genserve.server.layers.activation import Activation
from genserve.server.layers.attention import Attention
from genserve.server.layers.embedding import VocabParallelEmbedding
from genserve.server.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from genserve.server.layers.norm import LayerNorm
from genserve.server.models.common import CausalLM, add_prefix, load_fused

# causal-mask buffers that older checkpoints saved beside the weights
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def load_conv1d(layer: nn.Module, parts: list[tuple[object, int]] | None = None) -> None:
    parts = parts or [(None, layer.output_size * layer.tp_size if isinstance(layer, ColumnParallelLinear)
                       else layer.output_size)]
    load_fused(layer.weight, parts, transposed=True)
    if layer.bias is not None and len(parts) > 1:
        load_fused(layer.bias, parts)


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        self.c_attn = QKVParallelLinear(hidden, head_dim, heads, heads, bias=True)
        load_conv1d(self.c_attn, [("q", hidden), ("k", hidden), ("v", hidden)])
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        load_conv1d(self.c_proj)
        scale = head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.q_size = self.c_attn.q_size
        self.attn = Attention(self.c_attn.num_heads, self.c_attn.num_kv_heads, head_dim, scale)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).split([self.q_size] * 3, dim=-1)
        return self.c_proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)
        load_conv1d(self.c_fc)
        load_conv1d(self.c_proj)
        self.act = Activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.ln_1(hidden)
        else:
            hidden, residual = self.ln_1(hidden, residual)
        hidden, residual = self.ln_2(self.attn(hidden), residual)
        return self.mlp(hidden), residual


class GPT2Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)  # replicated on every rank
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def embedding(self) -> VocabParallelEmbedding:
        return self.wte

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.wte(input_ids) + self.wpe(positions), None
        for block in self.h:
            hidden, residual = block(hidden, residual)
        hidden, _ = self.ln_f(hidden, residual)
        return hidden


class GPT2LMHeadModel(CausalLM):
    body_name = "transformer"

    def build_body(self, config) -> nn.Module:
        return GPT2Model(config)

    def checkpoint_name(self, name: str) -> str | None:
        return None if name.endswith(MASK_BUFFERS) else add_prefix(name, "transformer.")


ARCHITECTURES = {"GPT2LMHeadModel": GPT2LMHeadModel}
