from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.server import kernels


class RMSNorm(nn.Module):
    """RMSNorm in float32, as HF Llama computes it; `forward(x, residual)` first adds x into the residual."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # fused kernel, same float32 math as HF (x * rsqrt(mean(x^2) + eps)); half the small ops
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(x.dtype)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        # one pass instead of up to six ops (and OpenMP regions) on CPU; float32 only: without native
        # bf16 conversions the kernel's bf16 rounding is slower than PyTorch's (AVX2 EPYC)
        return (x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32 == self.weight.dtype
                and kernels.load_cpu_kernels())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self._use_kernel(x) and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            out = kernels.rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = residual.add_(x)
        return self._norm(residual), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores w - 1, the weight is (1 + w), and the product is taken in float32
    before casting back (Llama casts first); `forward(x, residual)` adds as RMSNorm does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x)
        residual = residual.add_(x)
        return self._norm(residual), residual


class LayerNorm(nn.Module):
    """LayerNorm with a bias (GPT-2, GPT-NeoX, BLOOM); `forward(x, residual)` adds as RMSNorm does."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        residual = residual.add_(x)
        return F.layer_norm(residual, (x.shape[-1],), self.weight, self.bias, self.eps), residual
