"""Host <-> device transfers of a step, one each way.

Every blocking copy of a step goes through here: `to_device` for the host values a step needs
(the runner's payload, the sampler's per-row parameters, gathered in a `HostBatch`), and
`to_host` for everything the host reads back (sampled ids, log-probabilities, top-n, prompt
scores), packed into one float64 tensor (exact for token ids below 2**53 and for float32 values).
"""

from __future__ import annotations

import torch

_tolist = torch.Tensor.tolist  # bound here: a test counting stray .tolist() calls patches the class


def to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (a list, or a CPU tensor already built) on `device`, in one copy."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host if device.type == "cpu" else host.to(device)
    # pinned + non_blocking: the copy is queued behind the running kernels, the host does not wait
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensors: list[torch.Tensor]) -> list[list]:
    """One device -> host copy for all `tensors`; each comes back as a list (a list of rows when 2-D)."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    values = _tolist(flat.cpu())
    out, offset = [], 0
    for t in tensors:
        part = values[offset:offset + t.numel()]
        offset += t.numel()
        if t.dim() == 2:
            width = t.shape[1]
            part = [part[i * width:(i + 1) * width] for i in range(t.shape[0])]
        out.append(part)
    return out


class HostBatch:
    """Host values gathered for one host -> device copy; each part comes back as its own device tensor."""

    def __init__(self) -> None:
        self._parts: list[tuple[list, torch.dtype]] = []

    def add(self, values: list, dtype: torch.dtype = torch.float32) -> int:
        self._parts.append((values, dtype))
        return len(self._parts) - 1

    def to(self, device: torch.device) -> list[torch.Tensor]:
        flat = [v for values, _ in self._parts for v in values]
        if not flat:  # nothing to copy (every row greedy, no penalties)
            return [torch.empty(0, dtype=dtype, device=device) for _, dtype in self._parts]
        packed = to_device(flat, device, torch.float64)
        out, offset = [], 0
        for values, dtype in self._parts:
            out.append(packed[offset:offset + len(values)].to(dtype))
            offset += len(values)
        return out
