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
