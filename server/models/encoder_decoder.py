"""Pieces the native encoder-decoder families (BART, T5) share.

A step's decoder tokens are laid out as the decoder-only models' are (decode rows first, one token
each, then multi-token chunks), and their self-attention K/V go through the paged pool
(layers/attention.py). What is new here:

- the encoder: bidirectional attention over each prompt alone (tokens flat, one SDPA per prompt);
- cross-attention: each request's K/V [heads, prompt_len, head_dim] per decoder layer, computed once
  from its encoder output (`CrossKV`); a step reads them through a `CrossBatch` (decode rows padded to
  the longest prompt under a mask, chunks one by one);
- `BiasedAttention`: paged self-attention with an additive per-head score bias (T5's relative position
  bias), through the gather path since the native kernel and FlashAttention take no bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from genserve.server.layers import kv_storage
from genserve.server.layers.attention import Attention, AttentionMetadata, attend, get_forward_context

# per decoder layer: cross-attention K and V, [heads, prompt_len, head_dim] each
CrossKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class CrossBatch:
    """The cross-attention K/V one decoder forward reads, in the step's token order."""
    num_decode: int  # decode rows: the first num_decode tokens, one per request
    decode_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [B, heads, S, head_dim], right-padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, S] bool, True on real prompt tokens; None: no padding
    chunk_kv: list[CrossKV]  # one per multi-token chunk, after the decode rows
    chunk_starts: list[int]  # chunk i covers tokens num_decode + [starts[i], starts[i + 1])

    @property
    def num_rows(self) -> int:
        return self.num_decode + len(self.chunk_kv)


def pad_decode_rows(rows: list[CrossKV]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """Per layer, the rows' cross K/V stacked and right-padded to the longest prompt, and the mask."""
    lengths = [row[0][0].shape[1] for row in rows]
    width = max(lengths)
    padded = []
    for layer in range(len(rows[0])):
        k0 = rows[0][layer][0]
        keys = k0.new_zeros((len(rows), k0.shape[0], width, k0.shape[2]))
        values = torch.zeros_like(keys)
        for i, row in enumerate(rows):
            keys[i, :, :lengths[i]] = row[layer][0]
            values[i, :, :lengths[i]] = row[layer][1]
        padded.append((keys, values))
    if min(lengths) == width:
        return padded, None
    mask = torch.arange(width, device=keys.device)[None, :] < torch.tensor(lengths, device=keys.device)[:, None]
    return padded, mask.view(len(rows), 1, 1, width)


class CrossAttention(nn.Module):
    """Queries of this step's decoder tokens over their own request's encoder K/V (layer `layer_idx`)."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.layer_idx = num_heads, head_dim, scale, layer_idx

    def forward(self, q: torch.Tensor, cross: CrossBatch) -> torch.Tensor:
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        out = torch.empty_like(q)
        nd = cross.num_decode
        if nd:
            keys, values = cross.decode_kv[self.layer_idx]
            out[:nd] = attend(q[:nd, :, None], keys, values, self.scale, cross.decode_mask)[:, :, 0]
        for i, kv in enumerate(cross.chunk_kv):
            start, end = nd + cross.chunk_starts[i], nd + cross.chunk_starts[i + 1]
            keys, values = kv[self.layer_idx]
            out[start:end] = attend(q[start:end].transpose(0, 1)[None], keys[None], values[None],
                                    self.scale, None)[0].transpose(0, 1)
        return out.view(num_tokens, self.num_heads * self.head_dim)


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, head_dim: int,
                      scale: float, starts: list[int],
                      bias_for: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """Bidirectional attention of each prompt over itself: q, k, v [T, heads * head_dim] with prompt i at
    rows starts[i]:starts[i + 1]; bias_for(n): a [1, heads, n, n] score bias for a prompt of n tokens."""
    out = torch.empty_like(q)
    for begin, end in zip(starts, starts[1:], strict=False):
        n = end - begin
        q_i, k_i, v_i = (x[begin:end].view(n, num_heads, head_dim).transpose(0, 1)[None] for x in (q, k, v))
        bias = None if bias_for is None else bias_for(n)
        out[begin:end] = attend(q_i, k_i, v_i, scale, None, bias)[0].transpose(0, 1).reshape(n, -1)
    return out


def per_head_keys(k: torch.Tensor, v: torch.Tensor, num_heads: int, head_dim: int,
                  starts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Flat [T, heads * head_dim] K and V -> per prompt ([heads, n, head_dim], [heads, n, head_dim])."""
    out = []
    for begin, end in zip(starts, starts[1:], strict=False):
        n = end - begin
        out.append(tuple(x[begin:end].view(n, num_heads, head_dim).transpose(0, 1).contiguous() for x in (k, v)))
    return out


@dataclass(slots=True)
class ScoreBias:
    """A self-attention score bias for one step: decode rows [B, heads, 1, L] over the gathered contexts,
    and per chunk [1, heads, n, context_len]."""
    decode: torch.Tensor | None
    chunks: list[torch.Tensor]


class BiasedAttention(Attention):
    """Paged causal self-attention plus an additive score bias (`forward(q, k, v, bias)`); decode rows need the
    gather backend's metadata (the bias covers its padded contexts)."""

    @property
    def has_score_mods(self) -> bool:
        return True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: ScoreBias) -> torch.Tensor:
        meta = get_forward_context()
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        kv_storage.store(self.k_cache, meta.slot_mapping, k)
        kv_storage.store(self.v_cache, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            out[:nd] = self._biased_decode(q[:nd], meta, bias.decode)
        for i, ctx_len in enumerate(meta.prefill_context_lens):
            start, end = nd + meta.prefill_starts[i], nd + meta.prefill_starts[i + 1]
            index = meta.prefill_gather_index[i]
            keys, values = (k[start:end], v[start:end]) if index is None else (
                kv_storage.load(self.k_cache, index, q.dtype), kv_storage.load(self.v_cache, index, q.dtype))
            n = end - start
            visible = torch.ones((n, ctx_len), dtype=torch.bool, device=q.device).tril(ctx_len - n)
            out[start:end] = attend(q[start:end].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                    values.transpose(0, 1)[None], self.scale, visible,
                                    bias.chunks[i])[0].transpose(0, 1)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _biased_decode(self, q: torch.Tensor, meta: AttentionMetadata, bias: torch.Tensor) -> torch.Tensor:
        assert meta.decode_gather_index is not None, "BiasedAttention decodes through the gather backend"
        batch, width = q.shape[0], meta.decode_gather_index.shape[1]
        group = self.num_heads // self.num_kv_heads
        rows = meta.head_major_rows(self.num_kv_heads)
        shape = (batch, self.num_kv_heads, width, self.head_dim)
        keys = kv_storage.load(self.k_cache.view(-1, self.head_dim), rows, q.dtype).view(shape)
        values = kv_storage.load(self.v_cache.view(-1, self.head_dim), rows, q.dtype).view(shape)
        qg = q.view(batch, self.num_kv_heads, group, self.head_dim)
        out = attend(qg, keys, values, self.scale, meta.decode_mask,
                     bias.view(batch, self.num_kv_heads, group, width))
        return out.reshape(batch, self.num_heads, self.head_dim)


def unsupported_reason(hf_config) -> str | None:
    """Why the native class cannot serve this variant of its family (None: it can)."""
    from genserve.server.layers.activation import Activation

    act = getattr(hf_config, "activation_function", None) or getattr(hf_config, "dense_act_fn", None)
    if hf_config.model_type in ("t5", "mt5") and getattr(hf_config, "feed_forward_proj", "relu") == "gated-gelu":
        act = "gelu_new"
    try:
        Activation(act or "relu")
    except ValueError:
        return f"activation {act!r} has no native implementation"
    return None
