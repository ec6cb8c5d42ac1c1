"""How K/V sit in the paged pool: the model dtype, or float8 (TGI's --kv-cache-dtype fp8_e4m3fn | fp8_e5m2).

A float8 pool halves (bf16) or quarters (fp32) the KV cache's memory, so twice or four times the tokens
fit. Values are cast on the way in and widened back to the model dtype on the way out, with no scale
(vLLM's default k/v scale of 1.0: K and V stay well inside e4m3's +-448). Torch has no index_copy_ or
index_select for float8 on CPU, so both go through the pool's bytes viewed as uint8. Attention paths
that read the pool in place (the native CPU kernel, FlashAttention's paged decode) take the model dtype
only, so a float8 pool decodes through a gathered copy.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp8": torch.float8_e4m3fn}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def resolve_kv_cache_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    if name in (None, "", "auto"):
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"`--kv-cache-dtype` must be auto, fp8_e4m3fn or fp8_e5m2 (fp8 = fp8_e4m3fn); got {name!r}")
    return KV_CACHE_DTYPES[name]


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in FLOAT8


def store(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slots] = values, cast to the pool's dtype."""
    if cache.dtype == values.dtype:
        cache.index_copy_(0, slots, values)
    else:
        cache.view(torch.uint8).index_copy_(0, slots, values.to(cache.dtype).view(torch.uint8))


def load(cache: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[index] in `dtype` (a copy)."""
    if cache.dtype == dtype:
        return cache.index_select(0, index)
    return cache.view(torch.uint8).index_select(0, index).view(cache.dtype).to(dtype)
