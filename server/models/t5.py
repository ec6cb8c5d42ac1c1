"""T5 / mT5 / Flan-T5 (encoder-decoder): pre-norm layers with T5's RMS-style LayerNorm (no mean, no bias),
no score scaling, a relative position bias computed by each stack's first layer and added to every
layer's self-attention scores (bidirectional buckets in the encoder, causal in the decoder), relu or
gated (gated-gelu: Flan / v1.1 / mT5) feed-forward, and the decoder output scaled by d_model**-0.5
before a tied LM head (T5 1.0: `scale_decoder_outputs`). The decoder's self-attention K/V live in the
paged pool, read through the gather path with the bias added (encoder_decoder.BiasedAttention); its
cross-attention K/V per request. Module names follow the checkpoint."""

from __future__ import annotations

import math

import torch
from torch import nn

from genserve.server.layers.activation import Activation
from genserve.server.layers.attention import get_forward_context
from genserve.server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.server.layers.linear import ReplicatedLinear
from genserve.server.layers.norm import RMSNorm
from genserve.server.models.common import config_dtype, default_dtype
from genserve.server.models.encoder_decoder import (
    BiasedAttention,
    CrossAttention,
    CrossBatch,
    CrossKV,
    ScoreBias,
    encoder_attention,
    per_head_keys,
)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each (key position - query position): exact for small distances, log-spaced up to
    max_distance; the formula as transformers computes it, so the buckets are the same."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).to(torch.long) * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.min(relative, torch.zeros_like(relative))
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative, large)


class T5Attention(nn.Module):
    """q / k / v / o, and in a stack's first self-attention the relative_attention_bias table."""

    def __init__(self, config, has_relative_attention_bias: bool = False, is_decoder: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        inner = self.num_heads * self.head_dim
        self.q, self.k, self.v = (ReplicatedLinear(config.d_model, inner, False) for _ in range(3))
        self.o = ReplicatedLinear(inner, config.d_model, False)
        self.is_decoder = is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.num_heads)

    def bias(self, relative: torch.Tensor) -> torch.Tensor:
        """[..., L] relative positions -> [..., heads, L] score bias."""
        buckets = relative_position_bucket(relative, not self.is_decoder, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).movedim(-1, -2)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config, has_relative_attention_bias: bool, is_decoder: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, is_decoder)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        if is_decoder:  # the paged self-attention
            self.attn = BiasedAttention(config.num_heads, config.num_heads, config.d_kv, 1.0)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.cross = CrossAttention(config.num_heads, config.d_kv, 1.0, layer_idx)


class T5DenseReluDense(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.is_gated = getattr(config, "is_gated_act", config.feed_forward_proj.startswith("gated-"))
        if self.is_gated:
            self.wi_0 = ReplicatedLinear(config.d_model, config.d_ff, False)
            self.wi_1 = ReplicatedLinear(config.d_model, config.d_ff, False)
        else:
            self.wi = ReplicatedLinear(config.d_model, config.d_ff, False)
        self.wo = ReplicatedLinear(config.d_ff, config.d_model, False)
        act = getattr(config, "dense_act_fn", config.feed_forward_proj.split("-")[-1])
        self.act = Activation("gelu_new" if config.feed_forward_proj == "gated-gelu" else act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.DenseReluDense(self.layer_norm(hidden))


class T5Block(nn.Module):
    def __init__(self, config, layer_idx: int, is_decoder: bool) -> None:
        super().__init__()
        layers = [T5LayerSelfAttention(config, layer_idx == 0, is_decoder)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config, layer_idx))
        layers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(layers)

    def encode(self, hidden: torch.Tensor, starts: list[int], bias_for) -> torch.Tensor:
        block = self.layer[0]
        a, x = block.SelfAttention, block.layer_norm(hidden)
        attn = encoder_attention(a.q(x), a.k(x), a.v(x), a.num_heads, a.head_dim, 1.0, starts, bias_for)
        return self.layer[1](hidden + a.o(attn))

    def decode(self, hidden: torch.Tensor, bias: ScoreBias, cross: CrossBatch) -> torch.Tensor:
        block = self.layer[0]
        a, x = block.SelfAttention, block.layer_norm(hidden)
        hidden = hidden + a.o(block.attn(a.q(x), a.k(x), a.v(x), bias))
        block = self.layer[1]
        c = block.EncDecAttention
        hidden = hidden + c.o(block.cross(c.q(block.layer_norm(hidden)), cross))
        return self.layer[2](hidden)


class T5Stack(nn.Module):
    def __init__(self, config, num_layers: int, is_decoder: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(config, i, is_decoder) for i in range(num_layers))
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    @property
    def position_bias(self) -> T5Attention:
        return self.block[0].layer[0].SelfAttention


class T5ForConditionalGeneration(nn.Module):
    needs_score_bias = True  # decode rows read the pool through the gather backend, bias added

    def __init__(self, config, dtype: torch.dtype | None = None, has_lm_head: bool = False) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype or config_dtype(config)
        # transformers 5 keeps what a saved config's tie_word_embeddings meant in scale_decoder_outputs
        self.scale_outputs = bool(getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)))
        self.tie_word_embeddings = self.scale_outputs or not has_lm_head
        with default_dtype(self.dtype):
            self.shared = VocabParallelEmbedding(config.vocab_size, config.d_model)
            self.encoder = T5Stack(config, config.num_layers, is_decoder=False)
            self.decoder = T5Stack(config, config.num_decoder_layers or config.num_layers, is_decoder=True)
            self.lm_head = ParallelLMHead(config.vocab_size, config.d_model)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def checkpoint_name(self, name: str) -> str | None:
        if name.endswith("EncDecAttention.relative_attention_bias.weight"):
            return None  # saved by some checkpoints, never used (transformers ignores it too)
        return "shared.weight" if name.endswith("embed_tokens.weight") else name

    def encode(self, prompts: list[list[int]]) -> list[CrossKV]:
        """Run the encoder over each prompt, then every decoder layer's cross-attention K/V of it."""
        device = self.shared.weight.device
        starts = [0]
        for p in prompts:
            starts.append(starts[-1] + len(p))
        hidden = self.shared(torch.tensor([t for p in prompts for t in p], device=device))
        table, biases = self.encoder.position_bias, {}

        def bias_for(n: int) -> torch.Tensor:
            if n not in biases:
                positions = torch.arange(n, device=device)
                biases[n] = table.bias(positions[None, :] - positions[:, None]).transpose(0, 1)[None]
            return biases[n]

        for block in self.encoder.block:
            hidden = block.encode(hidden, starts, bias_for)
        hidden = self.encoder.final_layer_norm(hidden)
        per_layer = []
        for block in self.decoder.block:
            c = block.layer[1].EncDecAttention
            per_layer.append(per_head_keys(c.k(hidden), c.v(hidden), c.num_heads, c.head_dim, starts))
        return [[kv[i] for kv in per_layer] for i in range(len(prompts))]

    def _score_bias(self) -> ScoreBias:
        """The decoder's causal relative position bias for this step's decode rows and chunks."""
        meta, table = get_forward_context(), self.decoder.position_bias
        decode = None
        if meta.num_decode_tokens:
            decode = table.bias(meta.relative_positions())[:, :, None]  # [B, heads, 1, L]
        chunks = []
        for i, ctx_len in enumerate(meta.prefill_context_lens):
            n = meta.prefill_starts[i + 1] - meta.prefill_starts[i]
            keys = torch.arange(ctx_len, device=table.q.weight.device)
            relative = keys[None, :] - keys[ctx_len - n:, None]  # [n, ctx_len]
            chunks.append(table.bias(relative).transpose(0, 1)[None])
        return ScoreBias(decode, chunks)

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, cross: CrossBatch) -> torch.Tensor:
        """Decoder tokens flat [T] -> hidden [T, d_model] (inside forward_context; positions come from it)."""
        hidden, bias = self.shared(input_ids), self._score_bias()
        for block in self.decoder.block:
            hidden = block.decode(hidden, bias, cross)
        hidden = self.decoder.final_layer_norm(hidden)
        return hidden * self.config.d_model**-0.5 if self.scale_outputs else hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


ARCHITECTURES = {"T5ForConditionalGeneration": T5ForConditionalGeneration,
                 "MT5ForConditionalGeneration": T5ForConditionalGeneration}
