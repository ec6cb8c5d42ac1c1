"""Tensor-parallel helpers over the default process group (tp=1 when torch.distributed is not initialized)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_tp_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_tp_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` across ranks in place; a no-op at tp=1."""
    if get_tp_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    tp_size = get_tp_size()
    if tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
