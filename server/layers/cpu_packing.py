"""oneDNN's blocked weight layout for CPU matmuls, where it is faster on this CPU.

For decode-sized batches on CPU, `F.linear` (MKL) can run at a fraction of what oneDNN reaches with
a weight reordered once into its blocked layout: measured on SmolLM2's shapes at batch 32 with 2
threads on an AVX-512 EPYC, 3-4x faster in float32 and 1.2-1.3x in bfloat16; on an AVX2 EPYC packed
takes 0.5-0.85x the time, and at batch 1 about the same. Which is faster depends on the CPU, so
each weight shape is timed both ways at start (a few ms per shape) at the batch sizes decode runs:
one stream, a small batch, and one off the packing hint (where a layout chosen for one batch size
may be re-packed on every call). GENSERVE_CPU_LINEAR=packed|plain skips the timing.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
BATCH_HINT = 32
TIMED_BATCHES = (1, 7, BATCH_HINT - 1)
TIMING_ROUNDS = 5
_choices: dict[tuple, bool] = {}


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            # oneDNN's bf16 reorder needs avx512bw/vl/dq or avx_ne_convert (not on every x86 CPU)
            and (weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def should_pack(weight: torch.Tensor) -> bool:
    """Pack when oneDNN can and, unless GENSERVE_CPU_LINEAR says otherwise, when it is faster here."""
    if not can_pack(weight):
        return False
    mode = os.environ.get("GENSERVE_CPU_LINEAR", "auto")
    if mode in ("packed", "plain"):
        return mode == "packed"
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key not in _choices:
        ratio = packed_over_plain(weight)
        _choices[key] = ratio < 1.0
        logger.info("CPU linear %s %s: packed takes %.2fx the plain weight's time -> %s", list(weight.shape),
                    str(weight.dtype).removeprefix("torch."), ratio, "packed" if _choices[key] else "plain")
    return _choices[key]


def packed_over_plain(weight: torch.Tensor, rounds: int = TIMING_ROUNDS) -> float:
    """Median over rounds of packed / plain time, summed over TIMED_BATCHES. The two run back to back in
    each round, so whatever else the machine is doing slows both alike."""
    packed = pack_weight(weight)
    inputs = [torch.randn(batch, weight.shape[1], dtype=weight.dtype) for batch in TIMED_BATCHES]

    def seconds(run) -> float:
        started = time.perf_counter()
        for x in inputs:
            run(x)
        return time.perf_counter() - started

    def plain(x):
        return F.linear(x, weight)

    def blocked(x):
        return packed_linear(x, packed, None)

    with torch.inference_mode():
        seconds(plain), seconds(blocked)  # first calls: oneDNN builds its primitives
        ratios = sorted(seconds(blocked) / seconds(plain) for _ in range(rounds))
    return ratios[len(ratios) // 2]


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_model_for_cpu(model: nn.Module) -> int:
    """Pack every layer that knows how (`pack_for_cpu()`); returns how many were packed."""
    return sum(1 for module in model.modules() if hasattr(module, "pack_for_cpu") and module.pack_for_cpu())
