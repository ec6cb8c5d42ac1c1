"""Grouped integer weights: w[n, k] = q[n, k] * scale[n, g] + min[n, g], g = k // group_size.

The layout GPTQ, AWQ and GGUF Q4_0 / Q4_1 / Q8_0 share once their packing is undone (a zero point z
is min = -z * scale). Held per output row, so a column-parallel shard is a slice of rows and a
row-parallel shard a slice of whole groups:

    4-bit: qweight [N, K / 2] uint8, blocks of 32 values in 16 bytes, byte j = value j | value j + 16 << 4
           (GGUF's block order, kernels/int4_linear_cpu.cpp widens it in registers)
    8-bit: qweight [N, K] int8
    scale, min: [N, ceil(K / group_size)] float16 or float32
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per packed block; every group size is a multiple of it


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers 0..15 -> [N, K / 2] uint8 in the block layout above."""
    n, k = q.shape
    assert k % BLOCK == 0, f"K={k} is not a multiple of {BLOCK}"
    blocks = q.to(torch.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[N, K / 2] uint8 -> [N, K] uint8 values 0..15."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)


def integer_values(qweight: torch.Tensor) -> torch.Tensor:
    """The integers q of a 4-bit (uint8 pairs) or 8-bit (int8) qweight, [N, K]."""
    return unpack_nibbles(qweight) if qweight.dtype == torch.uint8 else qweight


def expand_groups(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[N, G] -> [N, K]: each group's value repeated over its columns (the last group may be short)."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] the kernels compute with: q * scale + min in float32 (then `dtype`)."""
    q = integer_values(qweight).float()
    k = q.shape[1]
    w = torch.addcmul(expand_groups(mins.float(), group_size, k), q, expand_groups(scale.float(), group_size, k))
    return w.to(dtype)


def quantize_int4(weight: torch.Tensor, group_size: int,
                  scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with a zero point per group (GPTQ / AWQ without act-order, before their calibration).

    scale = (max - min) / 15, zero z = round(-min / scale) in [0, 15], stored as min = -z * scale rounded
    to `scale_dtype`; q is rounded against the stored scale and min, so dequantize() gives back exactly
    the weight the kernels use.
    """
    n, k = weight.shape
    num_groups = -(-k // group_size)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, num_groups * group_size - k), value=float("nan"))
    groups = padded.view(n, num_groups, group_size)
    low = groups.nan_to_num(nan=float("inf")).amin(-1).clamp(max=0)
    high = groups.nan_to_num(nan=float("-inf")).amax(-1).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    zero = torch.round(-low / scale.float()).clamp(0, 15)
    mins = (-zero * scale.float()).to(scale_dtype)
    q = torch.round((w - expand_groups(mins.float(), group_size, k)) / expand_groups(scale.float(), group_size, k))
    return pack_nibbles(q.clamp(0, 15)), scale, mins


def quantize_int8(weight: torch.Tensor, group_size: int = BLOCK,
                  scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit groups (GGUF's Q8_0 for groups of 32): scale = absmax / 127 rounded to `scale_dtype`,
    q = round(w / scale) against the stored scale, min = 0. Returns (qweight int8 [N, K], scale, min)."""
    n, k = weight.shape
    num_groups = -(-k // group_size)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, num_groups * group_size - k))
    absmax = padded.view(n, num_groups, group_size).abs().amax(-1)
    scale = (absmax / 127).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    q = torch.round(w / expand_groups(scale.float(), group_size, k)).clamp(-127, 127).to(torch.int8)
    return q, scale, torch.zeros_like(scale)
