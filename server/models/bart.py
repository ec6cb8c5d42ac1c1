"""BART (encoder-decoder): learned positions offset by 2, embeddings scaled by sqrt(d_model) when
`scale_embedding`, a LayerNorm on the embeddings, post-norm layers (residual, then LayerNorm), q / k / v
with biases and 1/sqrt(head_dim) scores; the LM head is tied to the shared embedding, plus
`final_logits_bias`. The decoder's self-attention K/V live in the paged pool (layers/attention.py),
its cross-attention K/V per request (encoder_decoder.py). Module names follow the checkpoint."""

from __future__ import annotations

import math

import torch
from torch import nn

from genserve.server.layers.activation import Activation
from genserve.server.layers.attention import Attention
from genserve.server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.server.layers.linear import ReplicatedLinear
from genserve.server.layers.norm import LayerNorm
from genserve.server.models.common import config_dtype, default_dtype
from genserve.server.models.encoder_decoder import (
    CrossAttention,
    CrossBatch,
    CrossKV,
    encoder_attention,
    per_head_keys,
)

POSITION_OFFSET = 2  # BART's learned position table starts two rows in


def linear(size_in: int, size_out: int, bias: bool = True) -> ReplicatedLinear:
    return ReplicatedLinear(size_in, size_out, bias)


class BartAttention(nn.Module):
    """q_proj / k_proj / v_proj / out_proj; the attention itself is the caller's (self, cross or encoder)."""

    def __init__(self, config, num_heads: int) -> None:
        super().__init__()
        d = config.d_model
        self.num_heads, self.head_dim = num_heads, d // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (linear(d, d) for _ in range(4))


class BartEncoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.self_attn = BartAttention(config, config.encoder_attention_heads)
        self.self_attn_layer_norm = LayerNorm(config.d_model)
        self.fc1 = linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = linear(config.encoder_ffn_dim, config.d_model)
        self.act = Activation(config.activation_function)
        self.final_layer_norm = LayerNorm(config.d_model)

    def forward(self, hidden: torch.Tensor, starts: list[int]) -> torch.Tensor:
        a = self.self_attn
        attn = encoder_attention(a.q_proj(hidden), a.k_proj(hidden), a.v_proj(hidden), a.num_heads, a.head_dim,
                                 a.scale, starts)
        hidden = self.self_attn_layer_norm(hidden + a.out_proj(attn))
        return self.final_layer_norm(hidden + self.fc2(self.act(self.fc1(hidden))))


class BartDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        heads = config.decoder_attention_heads
        self.self_attn = BartAttention(config, heads)
        a = self.self_attn
        self.attn = Attention(heads, heads, a.head_dim, a.scale)  # the paged self-attention
        self.self_attn_layer_norm = LayerNorm(config.d_model)
        self.encoder_attn = BartAttention(config, heads)
        self.cross = CrossAttention(heads, a.head_dim, a.scale, layer_idx)
        self.encoder_attn_layer_norm = LayerNorm(config.d_model)
        self.fc1 = linear(config.d_model, config.decoder_ffn_dim)
        self.fc2 = linear(config.decoder_ffn_dim, config.d_model)
        self.act = Activation(config.activation_function)
        self.final_layer_norm = LayerNorm(config.d_model)

    def forward(self, hidden: torch.Tensor, cross: CrossBatch) -> torch.Tensor:
        a = self.self_attn
        attn = self.attn(a.q_proj(hidden), a.k_proj(hidden), a.v_proj(hidden))
        hidden = self.self_attn_layer_norm(hidden + a.out_proj(attn))
        c = self.encoder_attn
        hidden = self.encoder_attn_layer_norm(hidden + c.out_proj(self.cross(c.q_proj(hidden), cross)))
        return self.final_layer_norm(hidden + self.fc2(self.act(self.fc1(hidden))))


class BartStack(nn.Module):
    def __init__(self, config, layers: nn.ModuleList) -> None:
        super().__init__()
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.d_model)
        self.layernorm_embedding = LayerNorm(config.d_model)
        self.layers = layers

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.layernorm_embedding(tokens + self.embed_positions(positions + POSITION_OFFSET))


class BartModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.shared = VocabParallelEmbedding(config.vocab_size, config.d_model)
        self.encoder = BartStack(config, nn.ModuleList(BartEncoderLayer(config)
                                                       for _ in range(config.encoder_layers)))
        self.decoder = BartStack(config, nn.ModuleList(BartDecoderLayer(config, i)
                                                       for i in range(config.decoder_layers)))


class BartForConditionalGeneration(nn.Module):
    needs_score_bias = False  # plain causal self-attention: any decode backend serves it

    def __init__(self, config, dtype: torch.dtype | None = None, has_lm_head: bool = False) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype or config_dtype(config)
        self.embed_scale = math.sqrt(config.d_model) if getattr(config, "scale_embedding", False) else 1.0
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True)) or not has_lm_head
        with default_dtype(self.dtype):
            self.model = BartModel(config)
            self.lm_head = ParallelLMHead(config.vocab_size, config.d_model)
            self.final_logits_bias = nn.Parameter(torch.zeros(1, config.vocab_size), requires_grad=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.shared.weight

    def checkpoint_name(self, name: str) -> str:
        # older checkpoints hold each stack's copy of the shared embedding
        return "model.shared.weight" if name.endswith("embed_tokens.weight") else name

    def _tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.shared(input_ids)
        return hidden * self.embed_scale if self.embed_scale != 1.0 else hidden

    def encode(self, prompts: list[list[int]]) -> list[CrossKV]:
        """Run the encoder over each prompt, then every decoder layer's cross-attention K/V of it."""
        device = self.model.shared.weight.device
        starts = [0]
        for p in prompts:
            starts.append(starts[-1] + len(p))
        ids = torch.tensor([t for p in prompts for t in p], device=device)
        positions = torch.cat([torch.arange(len(p), device=device) for p in prompts])
        hidden = self.model.encoder.embed(self._tokens(ids), positions)
        for layer in self.model.encoder.layers:
            hidden = layer(hidden, starts)
        per_layer = [per_head_keys(layer.encoder_attn.k_proj(hidden), layer.encoder_attn.v_proj(hidden),
                                   layer.cross.num_heads, layer.cross.head_dim, starts)
                     for layer in self.model.decoder.layers]
        return [[kv[i] for kv in per_layer] for i in range(len(prompts))]

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, cross: CrossBatch) -> torch.Tensor:
        """Decoder tokens flat [T] at their decoder positions [T] -> hidden [T, d_model] (inside forward_context)."""
        hidden = self.model.decoder.embed(self._tokens(input_ids), positions)
        for layer in self.model.decoder.layers:
            hidden = layer(hidden, cross)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) + self.final_logits_bias[0]


ARCHITECTURES = {"BartForConditionalGeneration": BartForConditionalGeneration}
