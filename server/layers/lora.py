"""Batched LoRA over a mixed step (the S-LoRA / Punica idea): the step's rows come in segments that share an
adapter, and each LoRA-targeted linear adds, per segment, `(x_seg @ A^T) @ (scale * B)^T` to the base
output. Weights are never merged and adapters never run as separate steps; base rows pay nothing.

Fused layers (q|k|v, gate|up) hold one delta for all their adapted slices: the slices' A matrices stacked,
and their B matrices as one block-diagonal matrix (zeros for slices the adapter leaves alone), so a segment
costs two matmuls per layer whatever the slices.

Tensor parallelism shards a module's LoRA as its base layer: a column-parallel layer keeps A whole and
this rank's rows of B; a row-parallel layer keeps this rank's columns of A and B whole, and its partial
delta joins the base's partial sums before the layer's all-reduce.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from genserve.server.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

Segment = tuple[int, int, int]  # rows [start, end) of the step, adapter index (never 0: base rows)
Layout = tuple[tuple[int, int, int], ...]  # (adapter index, first, last rank column) of a stacked layer
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:\w+\.)*(\w+)$")
MAX_STACKED_RANK = 256  # above this many stacked rank columns a layer runs its segments one by one


class StepSegments:
    """A step's segments, the row span [lo, hi) they cover, and one row mask per stacked layout (layers with
    the same adapters share it, so a step builds a handful, not one per layer)."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self.lo = min((s for s, _, _ in segments), default=0)
        self.hi = max((e for _, e, _ in segments), default=0)
        self.masks: dict[Layout, torch.Tensor | None] = {}

    def mask(self, layout: Layout, like: torch.Tensor) -> torch.Tensor | None:
        """[hi - lo, stacked rank] ones where a row's adapter owns the column; None when no row uses the layer."""
        if layout not in self.masks:
            columns = {index: (first, last) for index, first, last in layout}
            mask = None
            for start, end, index in self.segments:
                if index in columns:
                    if mask is None:
                        mask = like.new_zeros(self.hi - self.lo, layout[-1][2])
                    first, last = columns[index]
                    mask[start - self.lo:end - self.lo, first:last] = 1
            self.masks[layout] = mask
        return self.masks[layout]


_step: StepSegments | None = None


@contextmanager
def lora_context(segments: list[Segment]) -> Iterator[None]:
    """The step's adapter segments for every LoRA layer of the forward pass inside the block."""
    global _step
    _step = StepSegments(segments) if segments else None
    try:
        yield
    finally:
        _step = None


@dataclass(slots=True)
class LayerDelta:
    a_t: torch.Tensor  # [local in_features, R]: the slices' lora_A stacked, transposed (R = their ranks summed)
    b_t: torch.Tensor  # [R, local out_features]: block-diagonal lora_B times the scale, transposed


class LinearLoRA:
    """The deltas of one linear layer, per resident adapter index (a plain object: not a submodule, so the
    model's parameters and checkpoint names stay the base's)."""

    def __init__(self, layer: LinearBase) -> None:
        self.layer = layer
        self.deltas: dict[int, LayerDelta] = {}
        self._stacked: tuple[Layout, torch.Tensor, torch.Tensor] | None = None

    def set_delta(self, index: int, delta: LayerDelta) -> None:
        self.deltas[index] = delta
        self._stacked = None

    def drop_delta(self, index: int) -> None:
        if self.deltas.pop(index, None) is not None:
            self._stacked = None

    def _stack(self) -> tuple[Layout, torch.Tensor, torch.Tensor]:
        """Every resident adapter's A side by side and B one above another: one pass serves all segments."""
        if self._stacked is None:
            layout, first = [], 0
            for index, delta in sorted(self.deltas.items()):
                layout.append((index, first, first + delta.a_t.shape[1]))
                first += delta.a_t.shape[1]
            items = [self.deltas[index] for index, _, _ in layout]
            self._stacked = (tuple(layout), torch.cat([d.a_t for d in items], 1), torch.cat([d.b_t for d in items]))
        return self._stacked

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [T, in] the layer's (local) input, y: [T, out] its base output; adds each segment's delta in place.

        Stacked (few rank columns): y[lo:hi] += ((x[lo:hi] @ A_all) * row_mask) @ B_all, three ops whatever the
        number of segments; the mask zeroes the columns of the other adapters (and every column of base rows)."""
        step = _step
        if step is None or not self.deltas:
            return y
        layout, a_all, b_all = self._stack()
        if a_all.shape[1] <= MAX_STACKED_RANK:
            mask = step.mask(layout, x)
            if mask is not None:
                lo, hi = step.lo, step.hi
                y[lo:hi].addmm_(torch.mm(x[lo:hi], a_all).mul_(mask), b_all)
            return y
        for start, end, index in step.segments:
            delta = self.deltas.get(index)
            if delta is not None:  # else the adapter does not target this module
                y[start:end].addmm_(torch.mm(x[start:end], delta.a_t), delta.b_t)
        return y


def lora_shard(layer: LinearBase, shard_id) -> tuple[int, int, slice, slice]:
    """This rank's part of a module's LoRA in `layer`: (output offset, output size, rows of B, columns of A);
    the same rows and columns the base layer's weight_loader reads."""
    rank = layer.tp_rank
    if isinstance(layer, RowParallelLinear):
        size = layer.input_size
        return 0, layer.output_size, slice(None), slice(rank * size, (rank + 1) * size)
    if isinstance(layer, QKVParallelLinear):
        q, kv = layer.q_size, layer.kv_size
        kv_start = layer.kv_head_start * layer.head_dim
        offset, size, start = {"q": (0, q, rank * q), "k": (q, kv, kv_start), "v": (q + kv, kv, kv_start)}[shard_id]
    elif isinstance(layer, MergedColumnParallelLinear):
        size = layer.output_sizes[shard_id] // layer.tp_size
        offset, start = sum(layer.output_sizes[:shard_id]) // layer.tp_size, rank * size
    elif isinstance(layer, ColumnParallelLinear):
        offset, size, start = 0, layer.output_size, rank * layer.output_size
    else:
        offset, size, start = 0, layer.output_size, 0
    return offset, size, slice(start, start + size), slice(None)


Target = tuple[LinearLoRA, object]  # the fused layer's LoRA and the module's shard id in it (None: unfused)


def attach_lora(model: nn.Module, module_names: tuple[str, ...]) -> dict[tuple[int, str], Target]:
    """Give every decoder linear that holds one of `module_names` (PEFT names) a LinearLoRA; returns where each
    (layer index, PEFT module name) lands."""
    unpacked = {param_part: [] for param_part, _ in getattr(model, "packed_modules_mapping", {}).values()}
    for peft_name, (param_part, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        unpacked[param_part].append((peft_name, shard_id))
    targets: dict[tuple[int, str], Target] = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if match is None or not isinstance(module, LinearBase):
            continue
        layer_index, leaf = int(match.group(1)), match.group(2)
        parts = unpacked.get(leaf) or ([(leaf, None)] if leaf in module_names else [])
        parts = [(peft_name, shard_id) for peft_name, shard_id in parts if peft_name in module_names]
        if not parts:
            continue
        module.lora = module.lora or LinearLoRA(module)
        for peft_name, shard_id in parts:
            targets[(layer_index, peft_name)] = (module.lora, shard_id)
    return targets


def build_deltas(targets: dict[tuple[int, str], Target], weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                 scales: dict[str, float], dtype: torch.dtype, device: torch.device) -> dict[LinearLoRA, LayerDelta]:
    """One adapter's full lora_A [r, in] / lora_B [out, r] per (layer, module) -> this rank's delta per layer."""
    parts: dict[LinearLoRA, list[tuple[object, torch.Tensor, torch.Tensor]]] = {}
    for key, (a, b) in weights.items():
        lora, shard_id = targets[key]
        offset, size, b_rows, a_cols = lora_shard(lora.layer, shard_id)
        scaled_b = (b.float() * scales[key[1]])[b_rows]
        parts.setdefault(lora, []).append((offset, a[:, a_cols], scaled_b))
    deltas = {}
    for lora, items in parts.items():
        a_t = torch.cat([a for _, a, _ in items]).t()
        b_t = torch.zeros(a_t.shape[1], lora.layer.output_size)
        rank = 0
        for offset, a, b in items:
            b_t[rank:rank + a.shape[0], offset:offset + b.shape[0]] = b.t()
            rank += a.shape[0]
        deltas[lora] = LayerDelta(a_t.to(device=device, dtype=dtype).contiguous(),
                                  b_t.to(device=device, dtype=dtype).contiguous())
    return deltas
