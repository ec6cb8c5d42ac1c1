"""Weight-only quantization behind `--quantize` (the values: quant_methods.py).

`int4` / `int4-g32`: asymmetric 4-bit groups (grouped_weights.py, grouped_linear.py), as GPTQ / AWQ without
act-order. `int8` (TGI's `eetq`) and `fp8` keep one symmetric absmax scale per output channel (weight row):

    weight [out, in] (model dtype) -> q [out, in] (int8 | float8_e4m3fn) + scale [out] (model dtype)
    y = (x @ q^T) * scale + bias

`quantize_model` runs after `load_weights`, so each tensor-parallel rank quantizes only the shard it
holds, and the Column/RowParallel all_reduce/all_gather around the matmul stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.server import kernels, quant_methods
from genserve.server.layers import grouped_linear
from genserve.server.layers.embedding import quantize_vocabulary
from genserve.server.layers.grouped_weights import quantize_int4
from genserve.server.layers.linear import LinearBase

# TGI's values, every one of them answered (served or refused with the reason)
TGI_METHODS = ("awq", "gptq", "marlin", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8", "eetq",
               "exl2", "compressed-tensors")
INT4_GROUP_SIZES = {"int4": 128, "int4-g32": 32}
# up to this many rows torch's int8 x bf16 CPU kernel beats dequantize-then-matmul (decode batches);
# above it (prefill) the dense bf16 GEMM wins (measured on SmolLM2 shapes, benchmarks/quantization.py)
INT8PACK_MAX_ROWS = 16
# float32 decode batches up to this size: our kernel widens int8 rows in registers (1 byte read per
# weight instead of 4). AVX2 EPYC, one thread, 30 x [3072, 576]: batch 1 24 ms vs 36-39 ms fp32,
# batch 8 35 vs 49 ms; beyond, the step is bound by compute and oneDNN's fp32 GEMM wins
WEIGHT_ONLY_MAX_ROWS = 8


def _absmax_scale(weight: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row scale in the model dtype, so quantizing against it is exact w.r.t. what forward uses."""
    tiny = torch.finfo(weight.dtype).tiny
    return (weight.float().abs().amax(dim=1) / qmax).clamp(min=tiny).to(weight.dtype)


class Int8WeightOnly:
    """`--quantize int8` (or `eetq`): int8 weights, activations stay in the model dtype."""

    name = "int8"

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = _absmax_scale(weight, 127.0)
        q = torch.round(weight.float() / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return q, scale

    def apply(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (x.device.type == "cpu" and x.dtype == torch.float32 and rows <= WEIGHT_ONLY_MAX_ROWS
                and kernels.fits_weight_only_linear(weight) and kernels.load_cpu_kernels()):
            y = kernels.weight_only_linear(x.reshape(rows, -1), weight, scale, bias)
            return y.view(*x.shape[:-1], -1)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows <= INT8PACK_MAX_ROWS:
            y = torch._weight_int8pack_mm(x.reshape(rows, -1).contiguous(), weight, scale)
            y = y.view(*x.shape[:-1], -1)
        else:
            # float32 has no fast int8 kernel on CPU: a dense GEMM over the upcast weight wins
            y = F.linear(x, weight.to(x.dtype)).mul_(scale)
        return y if bias is None else y.add_(bias)


class Fp8WeightOnly:
    """`--quantize fp8`: float8 e4m3fn weights, dequantized to the model dtype in forward."""

    name = "fp8"

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fp8_max = torch.finfo(torch.float8_e4m3fn).max
        scale = _absmax_scale(weight, fp8_max)
        q = (weight.float() / scale.float()[:, None]).clamp_(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
        return q, scale

    def apply(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, fp8_to(weight, x.dtype)).mul_(scale)
        return y if bias is None else y.add_(bias)


def fp8_to(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact float8_e4m3fn -> dtype. On CPU `.to()` is ~6x slower than this bit move through bf16."""
    if q.device.type != "cpu":
        return q.to(dtype)
    # s eeee mmm -> bf16 s 0000eeee mmm0000: the same value scaled by 2**-120 (bias 7 vs 127),
    # subnormals included; NaN (0x7f) never occurs since quantize_weight clamps to +-448
    bits = (q.view(torch.int8).to(torch.int16) << 4) & -0x7810  # -0x7810 == int16 0x87F0
    return (bits.view(torch.bfloat16) * 2.0**120).to(dtype)


class Int4Grouped:
    """`--quantize int4` (groups of 128) / `int4-g32`: each layer's weight becomes 4-bit groups."""

    def __init__(self, name: str, group_size: int) -> None:
        self.name = name
        self.group_size = group_size

    def quantize_layer(self, layer: LinearBase) -> None:
        grouped_linear.check_groups(layer, self.group_size)
        qweight, scale, mins = quantize_int4(layer.weight.data, self.group_size)
        grouped_linear.attach(layer, qweight, scale, mins, self.group_size)


METHODS = {m.name: m for m in (Int8WeightOnly(), Fp8WeightOnly(),
                               *(Int4Grouped(name, size) for name, size in INT4_GROUP_SIZES.items()))}
METHODS["eetq"] = METHODS["int8"]


def get_quant_method(method: str):
    quant_methods.check_method(method)
    if method not in METHODS:
        raise ValueError(f"--quantize {method} is a checkpoint's format: the model must be a {method} checkpoint")
    return METHODS[method]


@torch.no_grad()
def quantize_model(model, method: str | None) -> None:
    """Quantize every parallel Linear of a loaded model in place; raise ValueError for unsupported methods.

    int8 / int4 also hold the embedding and LM head (once when tied) in 8-bit groups of 32
    (embedding.quantize_vocabulary): at one stream the head is the largest single read per token. fp8
    keeps them, like the norms, in the model dtype. A checkpoint loaded already quantized (GPTQ, AWQ,
    GGUF) takes no --quantize but its own name.
    """
    quant_methods.check_method(method)
    loaded_as = getattr(model, "checkpoint_quantization", None)
    if loaded_as is not None:
        if method not in (None, loaded_as):
            raise ValueError(f"--quantize {method}: the checkpoint is already quantized ({loaded_as}); "
                             f"drop --quantize or pass --quantize {loaded_as}")
        return
    if not method:
        return
    if method in quant_methods.CHECKPOINT_METHODS:
        raise ValueError(f"--quantize {method} needs a {method} checkpoint; the model holds unquantized weights")
    quant = get_quant_method(method)
    layers = [m for m in model.modules() if isinstance(m, LinearBase)] if isinstance(model, nn.Module) else []
    if not layers:
        raise ValueError(f"`--quantize {method}` needs genserve's native model implementation; "
                         f"{type(model).__name__} (the transformers fallback) cannot be quantized")
    for layer in layers:
        if isinstance(quant, Int4Grouped):
            quant.quantize_layer(layer)
        else:
            layer.quantize(quant)
    if isinstance(quant, (Int4Grouped, Int8WeightOnly)):
        quantize_vocabulary(model)
    if isinstance(quant, Int4Grouped):
        grouped_linear.choose_kernels(model, getattr(model, "dtype", torch.float32))
