"""A parallel Linear serving grouped integer weights (grouped_weights.py's layout), and the startup choice
of the fastest kernel for each weight shape.

Batches up to GROUPED_MAX_ROWS rows (decode, short prefills) run our kernel (kernels/int4_linear_cpu.cpp) or torch's
packed int4 CPU matmul (`_weight_int4pack_mm_for_cpu`), whichever is faster on this CPU for that shape,
timed at startup; larger batches (long prefills) dequantize the weight and run the dense GEMM. Without the native kernels, every batch dequantizes.
With `--activation-quantization int8`, batches up to a row count timed per weight shape at startup round x to int8
and run integer dot products instead (kernels/int8_dot_cpu.cpp): ~1.5-2x faster at one row, close to but not equal
to the float kernel.
Under bfloat16 on a CPU that multiplies bf16 in hardware, batches from a row count timed at startup run a bf16
kernel instead, weights dequantized to bf16 panels and products summed in float32: AMX tiles
(kernels/grouped_amx_cpu.cpp) or AVX512-BF16 dot products (kernels/grouped_dpbf16_cpu.cpp, for Zen 4 and other CPUs
without AMX), whichever is faster; past GROUPED_MAX_ROWS the dequantized dense GEMM stays faster ([3072, 576],
dequantize + GEMM vs AMX: 2,048 rows 5.6 vs 10.5 ms; 256 rows 1.9 vs 0.9).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from genserve.server import distributed, kernels
from genserve.server.layers.grouped_weights import BLOCK, dequantize, integer_values
from genserve.server.layers.linear import LinearBase, RowParallelLinear

logger = logging.getLogger(__name__)

# up to this many rows our kernel beats dequantize + dense GEMM: AVX2 EPYC, 2 threads, [3072, 576] g32:
# 8 rows 2.4 vs 58 ms, 32 rows 16 vs 176 ms, 128 rows 48 vs 116 ms, 512 rows 155 vs 148 ms
GROUPED_MAX_ROWS = 256
# batch sizes timed for the int8-activation kernel against the kernel that serves them otherwise (the float one,
# or under bf16 the bf16 kernel from its row count on); it serves up to the largest it wins at (and every smaller
# one). [3072, 576] g32, 2 threads: AVX2 EPYC (Zen 3) up to 16 rows; Xeon with AMX up to 32 (x0.67 at 1 row, x0.93
# at 32, x1.01 at 64); Zen 4 (VNNI panels from 4 rows) against AVX512-BF16: x0.44 at 1 row, x0.67 at 32
INT8_TIMED_ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
TORCH_INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's packed int4 CPU matmul takes
BF16_TIMED_ROWS = (1, 2, 4, 8, 16, 32)  # batch sizes timed for the bf16-kernel choice; it holds above the largest
TIMED_BATCH = 32  # the decode batch choose_kernels times besides one row
PREFETCH_DISTANCES = (1, 2, 3, 4)  # weight tasks ahead the one-row kernels may prefetch (PrefetchTuner)


class GroupedWeights:
    """quant_method of one layer: its group size and which kernel serves its decode batches."""

    def __init__(self, layer: LinearBase, group_size: int, bits: int) -> None:
        self.layer = layer
        self.group_size = group_size
        self.bits = bits
        self.name = f"int{bits}-g{group_size}"
        self.torch_int4: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed, scale_and_zeros) when chosen
        self.input_order: torch.Tensor | None = None  # act-order GPTQ: columns are held in this order of x
        self.int8_max_rows = 0  # --activation-quantization int8: batches up to this many rows round x to int8
        # bf16 batches of bf16_min_rows or more run bf16_kernel (choose_bf16_kernels)
        self.bf16_kernel: str | None = None
        self.bf16_min_rows: int | None = None

    @property
    def int8_activations(self) -> bool:
        return self.int8_max_rows > 0

    @property
    def input_features(self) -> int:
        """K of the held weight (two 4-bit values per byte)."""
        return self.layer.weight.shape[1] * (2 if self.bits == 4 else 1)

    def dequantized(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight [N, K], or only its `rows` (an embedding lookup dequantizes just those)."""
        layer = self.layer
        qweight, scale, mins = layer.weight, layer.weight_scale, layer.weight_min
        if rows is not None:
            qweight, scale, mins = qweight[rows], scale[rows], mins[rows]
        if qweight.device.type == "cpu" and self.torch_int4 is None and kernels.load_cpu_kernels():
            # one native pass, not six tensor ops: a single stream's embedding lookup is a few hundred us in Python
            return kernels.grouped_dequantize(qweight, scale, mins, self.group_size).to(dtype)
        return dequantize(qweight, scale, mins, self.group_size, dtype)

    def uses_bf16_kernel(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether a batch of `rows` in `dtype` would run the bf16 kernel, int8 activations aside."""
        return (self.bf16_min_rows is not None and self.bf16_min_rows <= rows <= GROUPED_MAX_ROWS
                and dtype == torch.bfloat16)

    def apply(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, -1)
        if self.input_order is not None:
            flat = flat.index_select(1, self.input_order)
        if self.torch_int4 is not None:
            packed, scale_and_zeros = self.torch_int4
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), packed, self.group_size,
                                                            scale_and_zeros.to(x.dtype))
            y = y if bias is None else y.add_(bias)
        elif self.uses_bf16_kernel(rows, x.dtype) and rows > self.int8_max_rows:
            y = BF16_KERNELS[self.bf16_kernel](flat, weight, scale, self.layer.weight_min, self.group_size, bias)
        elif (x.device.type == "cpu" and rows <= GROUPED_MAX_ROWS and weight.shape[0] % 4 == 0
              and kernels.load_cpu_kernels()):
            kernel = kernels.int4_linear_int8_activations if rows <= self.int8_max_rows else kernels.int4_linear
            y = kernel(flat, weight, scale, self.layer.weight_min, self.group_size, bias)
        else:
            y = F.linear(flat, self.dequantized(x.dtype), bias)
        return y.view(*x.shape[:-1], -1)


def check_groups(layer: LinearBase, group_size: int) -> None:
    """A row-parallel shard must hold whole groups; the packed blocks need K % 32 == 0."""
    k = layer.input_size
    if group_size % BLOCK or group_size <= 0:
        raise ValueError(f"group size {group_size} is not a positive multiple of {BLOCK}")
    if k % BLOCK:
        raise ValueError(f"{k} input features are not a multiple of {BLOCK}, which 4-bit blocks need")
    if isinstance(layer, RowParallelLinear) and layer.tp_size > 1 and k % group_size:
        raise ValueError(f"a {type(layer).__name__} shard of {k} input columns (rank {layer.tp_rank} of "
                         f"{layer.tp_size}) does not hold whole groups of {group_size}; use fewer shards or "
                         f"a group size dividing {k}")


def attach(layer: LinearBase, qweight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
           group_size: int) -> None:
    """Make `layer` serve qweight / scale / min (this rank's shard), replacing its float weight."""
    check_groups(layer, group_size)
    bits = 4 if qweight.dtype == torch.uint8 else 8
    layer.weight = nn.Parameter(qweight, requires_grad=False)
    layer.weight_scale = nn.Parameter(scale, requires_grad=False)
    layer.weight_min = nn.Parameter(mins, requires_grad=False)
    layer.quant_method = GroupedWeights(layer, group_size, bits)


def prepare_for_loading(layer: LinearBase, bits: int, group_size: int, scale_dtype: torch.dtype) -> None:
    """Empty grouped parameters of this rank's shape, filled by the layer's own weight_loader: every tensor is
    [out, ...], so column shards slice rows and row shards slice bytes / groups exactly like a float weight."""
    n, k = layer.output_size, layer.input_size
    check_groups(layer, group_size)
    num_groups = -(-k // group_size)
    device = layer.weight.device
    qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=device) if bits == 4 else \
        torch.empty(n, k, dtype=torch.int8, device=device)
    attach(layer, qweight, torch.empty(n, num_groups, dtype=scale_dtype, device=device),
           torch.empty(n, num_groups, dtype=scale_dtype, device=device), group_size)
    for param in (layer.weight, layer.weight_scale, layer.weight_min):
        param.weight_loader = layer.weight_loader


def grouped_layers(model: nn.Module) -> list[LinearBase]:
    return [m for m in model.modules() if isinstance(m, LinearBase) and isinstance(m.quant_method, GroupedWeights)]


def use_int8_activations(model: nn.Module) -> None:
    """`--activation-quantization int8`: every grouped linear, and a grouped LM head, rounds its small batches'
    activations to int8. Refused where there are no grouped linears (it has nothing to run on)."""
    linears = grouped_layers(model)
    if not linears:
        raise ValueError("`--activation-quantization int8` needs 4-bit or 8-bit grouped weights: a GGUF, GPTQ or "
                         "AWQ checkpoint, or --quantize int4 / int4-g32 / int4-g64 / int4-g128")
    if not kernels.load_cpu_kernels():
        raise ValueError("`--activation-quantization int8` needs genserve's native CPU kernels, which did not load "
                         "(a C++ compiler and ninja at run time; GENSERVE_CPU_KERNELS not 0)")
    dtype = getattr(model, "dtype", torch.float32)
    # The linears share one limit, timed on the largest of them (most of a step's weights): a fused decode step
    # switches all its layers at once, and the op-by-op path must round the same rows. Timing each shape and taking
    # the smallest let one noisy small shape set it. An embedding / LM head has its own limit, on both paths; a
    # tied pair holds one weight, timed once. (torch's int4pack layers never run our int8 kernel: limit 0.)
    ours = [m.quant_method for m in linears if m.quant_method.torch_int4 is None]
    groups = {"linears": ours} if ours else {}
    for method in grouped_methods(model):
        if method.torch_int4 is None and method not in ours:
            groups.setdefault(method.layer.weight.data_ptr(), []).append(method)
    timed = [_int8_max_rows(max(group, key=lambda m: m.layer.weight.numel()), dtype) for group in groups.values()]
    for group, limit in zip(groups.values(), distributed.broadcast_ints(timed), strict=True):
        for method in group:
            method.int8_max_rows = limit
    logger.info("int8 activations for %d grouped weights (batches up to %s rows)",
                sum(len(group) for group in groups.values()), sorted(set(timed)))


@torch.no_grad()
def _int8_max_rows(method: GroupedWeights, dtype: torch.dtype) -> int:
    """The largest of INT8_TIMED_ROWS up to which the int8-activation kernel beats the kernel that would serve those
    rows otherwise (the float one, or the bf16 kernel choose_bf16_kernels picked) at every timed size (at least 1:
    the flag asks for it); GENSERVE_INT8_ACTIVATION_ROWS=N fixes it (engines that must agree)."""
    if os.environ.get("GENSERVE_INT8_ACTIVATION_ROWS"):
        return int(os.environ["GENSERVE_INT8_ACTIVATION_ROWS"])
    layer = method.layer
    qweight, scale, mins, k = layer.weight, layer.weight_scale, layer.weight_min, method.input_features
    limit = 1
    for rows in INT8_TIMED_ROWS:
        # an LM head takes ms per call, and a call of 256 rows tens of ms
        calls = max(1, min(10, 2**23 // qweight.numel() // max(1, rows // 32)))
        operands = (torch.randn(rows, k, dtype=dtype), qweight, scale, mins, method.group_size, None)
        int8 = _best_of(partial(kernels.int4_linear_int8_activations, *operands), calls=calls)
        otherwise = BF16_KERNELS[method.bf16_kernel] if method.uses_bf16_kernel(rows, dtype) else kernels.int4_linear
        if int8 >= _best_of(partial(otherwise, *operands), calls=calls):
            break
        limit = rows
    logger.info("int%d [%d, %d] g%d: int8 activations up to %d rows", method.bits, qweight.shape[0], k,
                method.group_size, limit)
    return limit


def _to_torch_int4(layer: LinearBase, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's layout: w = (q - 8) * scale + zero, so zero = min + 8 * scale; [groups, N, 2]."""
    q = integer_values(layer.weight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scale = layer.weight_scale.float()
    zero = layer.weight_min.float() + 8 * scale
    return packed, torch.stack([scale.T, zero.T], dim=-1).to(dtype).contiguous()


def _best_of(fn, rounds: int = 5, calls: int = 10) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def choose_kernels(model: nn.Module, dtype: torch.dtype) -> dict:
    """Per 4-bit weight shape: time our kernels and torch's packed int4 matmul on one row and on a decode batch of
    TIMED_BATCH rows, keep torch's only where it wins both (on a Xeon with AMX in bf16 it won one row x2 and lost
    32 rows x5 to the AMX kernel); then, under bf16 on AMX, the row count from which the AMX kernel serves.

    GENSERVE_INT4_KERNEL=ours|torch skips the timing. With int8 activations (model.int8_activations) "ours" is the
    int8-activation kernel at one row. Returns {shape: choice} (also logged)."""
    forced = os.environ.get("GENSERVE_INT4_KERNEL")
    ours_kernel = kernels.int4_linear_int8_activations if getattr(model, "int8_activations", False) \
        else kernels.int4_linear
    bf16 = bf16_kernels(dtype)
    choices: dict = {}
    timed = []  # (layer, key) in the model's order
    for layer in grouped_layers(model):
        method = layer.quant_method
        n, k = layer.weight.shape[0], layer.input_size
        usable = (method.bits == 4 and method.group_size in TORCH_INT4_GROUPS and k % method.group_size == 0
                  and layer.weight.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16))
        if not usable or forced == "ours" or not kernels.load_cpu_kernels() and forced != "torch":
            continue
        key = (n, k, method.group_size, layer.weight_scale.dtype)
        if key not in choices:
            if forced == "torch":
                choices[key] = "torch"
            else:
                packed, scale_and_zeros = _to_torch_int4(layer, dtype)
                g, w, s, mn = method.group_size, layer.weight, layer.weight_scale, layer.weight_min
                batch_kernel = next((BF16_KERNELS[name] for name in bf16 if n % BF16_ROW_MULTIPLE[name] == 0),
                                    kernels.int4_linear)
                times = []
                for rows, ours in ((1, ours_kernel), (TIMED_BATCH, batch_kernel)):
                    x = torch.randn(rows, k, dtype=dtype)
                    calls = 10 if rows == 1 else 2
                    ours_s = _best_of(partial(ours, x, w, s, mn, g, None), calls=calls)
                    theirs_s = _best_of(partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, g,
                                                scale_and_zeros), calls=calls)
                    times.append((rows, ours_s / calls, theirs_s / calls))
                    if theirs_s >= ours_s:
                        break  # torch's lost already: the batch timing (slow for it in float32) is not needed
                choices[key] = "torch" if all(theirs < ours for _, ours, theirs in times) else "ours"
                logger.info("int4 [%d, %d] g%d: %s -> %s", n, k, g, ", ".join(
                    f"{rows} rows ours {ours * 1e6:.1f} us, torch int4pack {theirs * 1e6:.1f} us"
                    for rows, ours, theirs in times), choices[key])
        timed.append((layer, key))
    kinds = ("ours", "torch")
    agreed = distributed.broadcast_ints([kinds.index(v) for v in choices.values()])
    choices = dict(zip(choices, (kinds[i] for i in agreed), strict=True))
    for layer, key in timed:
        method = layer.quant_method
        if choices[key] == "torch":
            packed, scale_and_zeros = _to_torch_int4(layer, dtype)
            method.torch_int4 = (packed, scale_and_zeros)
            layer.weight = nn.Parameter(packed, requires_grad=False)  # the plain nibbles are not kept
            layer.weight_scale = nn.Parameter(scale_and_zeros, requires_grad=False)
            layer.weight_min = nn.Parameter(layer.weight_min.new_empty(0), requires_grad=False)
    choices.update(choose_bf16_kernels(model, dtype))
    return choices


# the bf16-activation kernels, in the order choose_kernels prefers them untimed, and the multiple of rows each needs
BF16_KERNELS = {"amx": kernels.int4_linear_amx, "dpbf16": kernels.int4_linear_dpbf16}
BF16_ROW_MULTIPLE = {"amx": 16, "dpbf16": 4}


def bf16_kernels(dtype: torch.dtype) -> list[str]:
    """The bf16-activation kernels this CPU and build run (BF16_KERNELS' names), for bfloat16 models only.
    GENSERVE_BF16_KERNEL=amx|dpbf16 keeps just that one, =float none."""
    if dtype != torch.bfloat16 or not kernels.load_cpu_kernels():
        return []
    found = [name for name, usable in (("amx", kernels.has_amx_bf16), ("dpbf16", kernels.has_avx512_bf16))
             if usable()]
    forced = os.environ.get("GENSERVE_BF16_KERNEL")
    if forced is None:
        return found
    if forced not in (*BF16_KERNELS, "float"):
        raise ValueError(f"GENSERVE_BF16_KERNEL={forced!r}: one of {', '.join(BF16_KERNELS)} or float")
    if forced != "float" and forced not in found:
        logger.warning("GENSERVE_BF16_KERNEL=%s: this CPU or build cannot run it; the float kernels serve", forced)
    return [forced] if forced in found else []


def grouped_methods(model: nn.Module) -> list[GroupedWeights]:
    """The grouped linears' methods and a grouped embedding's / LM head's (once when tied)."""
    methods = {id(m.quant_method): m.quant_method for m in grouped_layers(model)}
    methods.update({id(m.grouped): m.grouped for m in model.modules() if getattr(m, "grouped", None) is not None})
    return list(methods.values())


@torch.no_grad()
def choose_bf16_kernels(model: nn.Module, dtype: torch.dtype) -> dict:
    """Under bfloat16, per weight shape: the bf16 kernel (bf16_kernels) fastest at the largest of BF16_TIMED_ROWS,
    and the fewest rows from which it beats the float kernel at every timed size. On a Xeon with AMX, 2 threads,
    [3072, 576] g32: AMX about even at 1 row, x5.8 at 32; on Zen 4, AVX512-BF16 x2.4 at 32.
    GENSERVE_BF16_MIN_ROWS=N fixes the row count (the kernel is then the first usable one). Returns
    {shape: (kernel, min rows) or None} (also logged)."""
    usable = bf16_kernels(dtype)
    if not usable:
        return {}
    forced = os.environ.get("GENSERVE_BF16_MIN_ROWS")
    choices: dict = {}
    timed = []  # (method, key) in the model's order
    for method in grouped_methods(model):
        layer = method.layer
        qweight, scale, mins = layer.weight, layer.weight_scale, layer.weight_min
        n = qweight.shape[0]
        candidates = [name for name in usable if n % BF16_ROW_MULTIPLE[name] == 0]
        if method.torch_int4 is not None or qweight.device.type != "cpu" or not candidates:
            continue
        key = ("bf16", *qweight.shape, method.bits, method.group_size, scale.dtype)
        if key not in choices and forced:
            choices[key] = (candidates[0], int(forced))
        elif key not in choices:
            calls = max(1, min(10, 2**24 // qweight.numel()))  # an LM head takes ms per call
            k = method.input_features
            seconds = {name: [] for name in ("float", *candidates)}
            for rows in BF16_TIMED_ROWS:
                operands = (torch.randn(rows, k, dtype=dtype), qweight, scale, mins, method.group_size, None)
                for name in seconds:
                    kernel = kernels.int4_linear if name == "float" else BF16_KERNELS[name]
                    seconds[name].append(_best_of(partial(kernel, *operands), rounds=3, calls=calls))
            best = min(candidates, key=lambda name: seconds[name][-1])
            wins = [ours < float_ for ours, float_ in zip(seconds[best], seconds["float"], strict=True)]
            min_rows = next((rows for i, rows in enumerate(BF16_TIMED_ROWS) if all(wins[i:])), None)
            choices[key] = None if min_rows is None else (best, min_rows)
            logger.info("int%d [%d, %d] g%d bf16: %s", method.bits, n, k, method.group_size,
                        "float kernels" if min_rows is None else f"{best} from {min_rows} rows")
        timed.append((method, key))
    names = list(BF16_KERNELS)
    # as ints for the broadcast: kernel index * 1000 + rows, -1 for none
    agreed = distributed.broadcast_ints([-1 if v is None else names.index(v[0]) * 1000 + v[1]
                                         for v in choices.values()])
    choices = dict(zip(choices, (None if v < 0 else (names[v // 1000], v % 1000) for v in agreed), strict=True))
    for method, key in timed:
        method.bf16_kernel, method.bf16_min_rows = choices[key] or (None, None)
    return choices


class PrefetchTuner:
    """The row kernels' weight prefetch distance (one-row float, int8-activation rows), chosen on the server's first
    one-row decode steps: they cycle through PREFETCH_DISTANCES, each cycle starting one further on (a step's time
    grows with its context), outputs never depending on it; once each distance has SAMPLES steps the one with the
    lowest median time per token stays. The kernels timed alone at startup could not tell the distances apart
    (within 1 %), while decode steps could: on a Xeon with AMX, float activations, 2 tasks ahead took x0.94 the
    time per token of 1 (int8 activations: 1 best); on Zen 3, 1 beat 4 and 8. GENSERVE_PREFETCH_DISTANCE=N fixes
    it instead."""

    SAMPLES = 8

    def __init__(self) -> None:
        self.seconds: dict[int, list[float]] = {d: [] for d in PREFETCH_DISTANCES}
        self.chosen: int | None = None
        self._steps = 0

    @classmethod
    def for_model(cls, model: nn.Module) -> PrefetchTuner | None:
        """A tuner where a one-row step reaches the row kernels (grouped linears on our layout, not all on AMX from
        one row); None where it does not or the distance is fixed (it is then set here)."""
        if not kernels.load_cpu_kernels() or not any(
                m.torch_int4 is None and m.layer.weight.device.type == "cpu" and m.bf16_min_rows != 1
                for m in (layer.quant_method for layer in grouped_layers(model))):
            return None
        forced = os.environ.get("GENSERVE_PREFETCH_DISTANCE")
        if forced:
            kernels.set_prefetch_distance(int(forced))
            return None
        return cls()

    @property
    def active(self) -> bool:
        return self.chosen is None

    def next_distance(self) -> int:
        """Set and return the distance the coming step runs with."""
        n = len(PREFETCH_DISTANCES)
        distance = PREFETCH_DISTANCES[(self._steps + self._steps // n) % n]
        kernels.set_prefetch_distance(distance)
        return distance

    def record(self, distance: int, seconds_per_token: float) -> None:
        self.seconds[distance].append(seconds_per_token)
        self._steps += 1
        if all(len(times) >= self.SAMPLES for times in self.seconds.values()):
            medians = {d: statistics.median(times) for d, times in self.seconds.items()}
            self.chosen = min(medians, key=medians.get)
            kernels.set_prefetch_distance(self.chosen)
            logger.info("one-row weight prefetch, median ms per token: %s -> %d tasks ahead",
                        ", ".join(f"{d}: {m * 1e3:.2f}" for d, m in medians.items()), self.chosen)
