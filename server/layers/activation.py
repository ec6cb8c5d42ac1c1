from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.server import kernels


class SiluAndMul(nn.Module):
    """[T, 2I] holding gate|up -> silu(gate) * up, [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
                and kernels.load_cpu_kernels()):
            return kernels.silu_and_mul(x)  # one pass instead of silu, then mul (see RMSNorm for why fp32)
        # unbind of a [T, 2, I] view is about 2x faster on CPU than chunk + in-place mul
        gate, up = x.view(x.shape[0], 2, -1).unbind(1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """[T, 2I] holding gate|up -> gelu(gate) * up (GeGLU; Gemma uses the tanh approximation)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.view(x.shape[0], 2, -1).unbind(1)
        return F.gelu(gate, approximate=self.approximate) * up


# HF ACT2FN names of the activations our families use; the gelu_new / gelu_fast / bloom formulas are the tanh
# approximation written out, equal to PyTorch's up to float rounding
_GELU_APPROXIMATION = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh",
                       "bloom_gelu": "tanh"}


def gelu_approximation(name: str) -> str:
    if name not in _GELU_APPROXIMATION:
        raise ValueError(f"activation {name!r} is not supported (one of {', '.join(_GELU_APPROXIMATION)})")
    return _GELU_APPROXIMATION[name]


class Activation(nn.Module):
    """An elementwise activation by its HF name: the gelu variants, relu, silu."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.approximate = None if name in ("relu", "silu") else gelu_approximation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "relu":
            return F.relu(x)
        if self.name == "silu":
            return F.silu(x)
        return F.gelu(x, approximate=self.approximate)


def gated_activation(name: str) -> nn.Module:
    """The gate|up activation for an HF hidden_act: SiluAndMul for silu, GeluAndMul for the gelu variants."""
    return SiluAndMul() if name == "silu" else GeluAndMul(gelu_approximation(name))
