"""Linear layers named for how they shard across tensor-parallel ranks.

Each parameter carries `weight_loader(param, loaded, shard_id=None)`. `loaded` is a full tensor or a
safetensors slice (`safe_open(...).get_slice(name)`); loaders index it so a rank reads only its rows/cols.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.server.distributed import all_reduce, get_tp_rank, get_tp_size
from genserve.server.layers.cpu_packing import pack_weight, packed_linear, should_pack


def _check_shape(param: torch.Tensor, loaded: torch.Tensor) -> torch.Tensor:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not fit parameter shape {tuple(param.shape)}")
    return loaded


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.quant_method = None  # set by quantize(); see layers/quantization.py
        self.packed_weight: torch.Tensor | None = None  # set by pack_for_cpu()
        self.lora = None  # a layers.lora.LinearLoRA when LoRA adapters may target this layer

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        raise NotImplementedError

    def quantize(self, method) -> None:
        """Swap the loaded weight (this rank's shard) for `method`'s compact weight and per-row scale."""
        weight, scale = method.quantize_weight(self.weight.data)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.quant_method = method

    def pack_for_cpu(self) -> bool:
        """Serve from oneDNN's blocked layout (see cpu_packing.py); the plain weight is not kept."""
        if self.quant_method is not None or not should_pack(self.weight):
            return False
        self.packed_weight = pack_weight(self.weight)
        self.weight = nn.Parameter(self.weight.data.new_empty(0), requires_grad=False)
        return True

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.base_matmul(x, bias)
        # LoRA deltas join before a row-parallel layer's all-reduce: they are partial sums too
        return y if self.lora is None else self.lora.add_to(x, y)

    def base_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, bias)
        if self.quant_method is None:
            return F.linear(x, self.weight, bias)
        return self.quant_method.apply(x, self.weight, self.weight_scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        param.data.copy_(_check_shape(param, loaded[:]))


class ColumnParallelLinear(LinearBase):
    """Splits the output features: rank r holds rows [r * out/tp, (r+1) * out/tp)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp_size = get_tp_size()
        assert output_size % tp_size == 0, f"{output_size} output features do not split over {tp_size} ranks"
        super().__init__(input_size, output_size // tp_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = param.shape[0]
        start = self.tp_rank * size
        param.data.copy_(_check_shape(param, loaded[start:start + size]))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_up); shard_id is the index into output_sizes."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        assert shard_id is not None, "merged linear needs a shard_id"
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        start = self.tp_rank * size
        target = param.data.narrow(0, offset, size)
        target.copy_(_check_shape(target, loaded[start:start + size]))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q|k|v. With fewer KV heads than ranks, KV heads are replicated: rank r holds kv head
    r * num_kv_heads // tp_size."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        tp_size, tp_rank = get_tp_size(), get_tp_rank()
        assert num_heads % tp_size == 0, f"{num_heads} attention heads do not split over {tp_size} ranks"
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        if num_kv_heads >= tp_size:
            assert num_kv_heads % tp_size == 0, f"{num_kv_heads} kv heads do not split over {tp_size} ranks"
            self.num_kv_heads = num_kv_heads // tp_size
            self.kv_head_start = tp_rank * self.num_kv_heads
        else:
            assert tp_size % num_kv_heads == 0, f"{tp_size} ranks do not share {num_kv_heads} kv heads evenly"
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank * num_kv_heads // tp_size
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        LinearBase.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        elif shard_id == "k":
            offset, size, start = self.q_size, self.kv_size, self.kv_head_start * self.head_dim
        elif shard_id == "v":
            offset, size, start = self.q_size + self.kv_size, self.kv_size, self.kv_head_start * self.head_dim
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', not {shard_id!r}")
        target = param.data.narrow(0, offset, size)
        target.copy_(_check_shape(target, loaded[start:start + size]))


class RowParallelLinear(LinearBase):
    """Splits the input features; partial outputs are summed across ranks, bias added once after."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp_size = get_tp_size()
        assert input_size % tp_size == 0, f"{input_size} input features do not split over {tp_size} ranks"
        super().__init__(input_size // tp_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # bias is not sharded
            param.data.copy_(_check_shape(param, loaded[:]))
            return
        size = param.shape[1]
        start = self.tp_rank * size
        param.data.copy_(_check_shape(param, loaded[:, start:start + size]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.matmul(x, self.bias)
        y = all_reduce(self.matmul(x, None))
        return y if self.bias is None else y.add_(self.bias)
