"""Rotary position embedding (neox half-split layout, as HF Llama), with Llama rope scaling types.

Reads `config.rope_parameters` (transformers 5) or legacy `rope_theta` / `rope_scaling`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict, max_positions: int) -> torch.Tensor:
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params.get("original_max_position_embeddings", max_positions)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_context_len / low_freq_factor, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= old_context_len / high_freq_factor) & (wavelen <= old_context_len / low_freq_factor)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, params: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    original = params.get("original_max_position_embeddings") or max_positions
    factor = params.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    extrapolation = torch.clamp((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low), 0, 1)
    extrapolation = 1 - extrapolation
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def compute_inv_freq(config, head_dim: int, params: dict | None = None) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [rotary_dim / 2] float32, attention scaling applied to cos/sin).

    params: one layer type's rope parameters (Gemma 3 keeps one set per layer type); the config's by default."""
    params = normalized_params(params) if params is not None else rope_parameters(config)
    rope_type, base = params["rope_type"], float(params["rope_theta"])
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    max_positions = config.max_position_embeddings
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, base, params, max_positions)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params, max_positions)
    # "dynamic" NTK equals the default inside max_position_embeddings, the only positions we cache
    elif rope_type in ("longrope", "su"):
        raise ValueError(f"rope_type {rope_type!r} has a short and a long set of frequencies: see longrope_freqs")
    elif rope_type not in ("default", "dynamic"):
        raise ValueError(f"rope_type {rope_type!r} is not supported")
    return inv_freq, 1.0


def normalized_params(params: dict) -> dict:
    params = dict(params)
    params.setdefault("rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


# A token a request rotates with LongRoPE's long factors comes with its position plus this (step_payload)
LONG_ROPE_OFFSET = 1 << 40


def longrope_original_length(config) -> int | None:
    """LongRoPE's pretraining length, beyond which a request is rotated with the long factors; None without it."""
    params = rope_parameters(config)
    if params["rope_type"] not in ("longrope", "su"):
        return None
    return params.get("original_max_position_embeddings") or config.original_max_position_embeddings


def longrope_freqs(config, head_dim: int, params: dict, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE ("su"): per-frequency divisors, a short set and a long set -> (angles [2 * positions,
    rotary_dim / 2]: the short set's rows, then the long set's, attention scaling).

    As transformers: a request no longer than original_max_position_embeddings is rotated with the short set,
    a longer one with the long set at every position (the scheduler recomputes a request outgrowing it)."""
    base = float(params["rope_theta"])
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    original = params.get("original_max_position_embeddings") or config.original_max_position_embeddings
    factor = params.get("factor") or config.max_position_embeddings / original
    scaling = params.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * base**exponents)
    long = 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * base**exponents)
    return torch.cat([torch.outer(positions.float(), short), torch.outer(positions.float(), long)]), scaling


class RotaryEmbedding(nn.Module):
    """Rotates q and k in place by each token's position; cos/sin cached for max_position_embeddings."""

    def __init__(self, config, head_dim: int, dtype: torch.dtype | None = None, params: dict | None = None) -> None:
        super().__init__()
        params = normalized_params(params) if params is not None else rope_parameters(config)
        positions = torch.arange(config.max_position_embeddings)
        # LongRoPE: rows [0, max) the short set, [max, 2 max) the long set (positions + LONG_ROPE_OFFSET)
        self.long_rows = config.max_position_embeddings if params["rope_type"] in ("longrope", "su") else 0
        if self.long_rows:
            freqs, scaling = longrope_freqs(config, head_dim, params, positions)
        else:
            inv_freq, scaling = compute_inv_freq(config, head_dim, params)
            freqs = torch.outer(positions.float(), inv_freq)
        self.head_dim = head_dim
        self.rotary_dim = 2 * freqs.shape[1]
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scaling
        # HF casts cos/sin to the activation dtype before rotating; so do we, once
        self.register_buffer("cos_sin_cache", cos_sin.to(dtype or torch.get_default_dtype()), persistent=False)
        self._positions: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] = ()

    def forward(self, positions: torch.Tensor, qk: torch.Tensor) -> None:
        # positions: [T]; qk: [T, (H + KVH) * D], the q|k part of the fused qkv output, rotated in place
        num_tokens = positions.shape[0]
        # every layer rotates by the same positions in a step: look cos/sin up once
        if positions is not self._positions:
            self._positions = positions
            rows = positions
            if self.long_rows:
                rows = torch.where(positions >= LONG_ROPE_OFFSET, positions - LONG_ROPE_OFFSET + self.long_rows, positions)
            self._cos_sin = self.cos_sin_cache[rows].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rotary_dim / 2]
        cos, sin = self._cos_sin
        x = qk.view(num_tokens, -1, self.head_dim)
        half = self.rotary_dim // 2
        x1, x2 = x[..., :half], x[..., half:self.rotary_dim]
        rotated1 = x1 * cos - x2 * sin
        x2.mul_(cos).add_(x1 * sin)
        x1.copy_(rotated1)
