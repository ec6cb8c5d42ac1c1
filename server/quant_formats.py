"""Checkpoints that come quantized: GPTQ and AWQ safetensors (their `quantization_config`) and GGUF folders
written by gguf_weights.py, loaded straight into grouped weights (layers/grouped_weights.py).

GPTQ (AutoGPTQ's packing, 4-bit):
    qweight int32 [K / 8, N]  8 values along the input dim, value j at bits 4j
    qzeros  int32 [G, N / 8]  8 zeros along the output dim; format "gptq" (v1) stores zero - 1
    scales  fp16  [G, N];  g_idx int32 [K] = group of each input column (act-order when not k // size:
    columns sorted by group, the layer reading x in that order)
AWQ (AutoAWQ's GEMM packing, 4-bit):
    qweight int32 [K, N / 8]  8 values along the output dim, slot i holds column AWQ_ORDER[i]
    qzeros  int32 [G, N / 8]  same packing;  scales fp16 [G, N]
Both: w = (q - z) * s, held as q * s + min with min = -z * s in float32 (exact for fp16 s and z < 17).
Each rank converts whole tensors, then its layers' weight_loaders take their shard.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from genserve.server.layers import grouped_linear
from genserve.server.layers.embedding import VocabParallelEmbedding
from genserve.server.layers.grouped_weights import dequantize, pack_nibbles
from genserve.server.layers.linear import LinearBase, RowParallelLinear
from genserve.server.loader import _map_name, load_named_tensors

logger = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_COLUMN_SLOT = tuple(AWQ_ORDER.index(j) for j in range(8))  # column j sits in slot AWQ_COLUMN_SLOT[j]
QUANTIZED_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def quantization_config(model_dir: Path) -> dict | None:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text()).get("quantization_config")


def refuse_pickles(model_dir: Path) -> None:
    """.bin (pickle) checkpoints run code when loaded: convert them once with `genserve convert`."""
    model_dir = Path(model_dir)
    if not any(model_dir.glob("*.safetensors")) and any(model_dir.glob("*.bin")):
        raise ValueError(f"{model_dir} holds only .bin (pickle) weights, which genserve does not load; convert "
                         f"them once with `genserve convert {model_dir}` (writes safetensors and checks them)")


def unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> 8 nibbles each along `dim` (value j of a word at bits 4j)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    values = (packed.unsqueeze(-1) >> shifts) & 0xF  # [..., 8]
    if dim == 0:
        return values.permute(0, 2, 1).reshape(packed.shape[0] * 8, packed.shape[1])
    return values.reshape(packed.shape[0], packed.shape[1] * 8)


def _grouped(q_kn: torch.Tensor, z_gn: torch.Tensor, s_gn: torch.Tensor):
    """[K, N] values, [G, N] zeros and scales -> (qweight [N, K/2], scale [N, G], min [N, G]) float32."""
    scale = s_gn.float().T.contiguous()
    return pack_nibbles(q_kn.T), scale, (-z_gn.float().T * scale).contiguous()


def _check(name: str, condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"checkpoint's quantization_config does not match its tensors: {name}: {what}")


def gptq_layer(prefix: str, parts: dict[str, torch.Tensor], config: dict):
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    group_size = config["group_size"] if config["group_size"] > 0 else k
    num_groups = -(-k // group_size)
    _check(prefix, tuple(scales.shape) == (num_groups, n),
           f"scales {tuple(scales.shape)} for {k} inputs in groups of {group_size} and {n} outputs")
    _check(prefix, tuple(qzeros.shape) == (num_groups, n // 8), f"qzeros {tuple(qzeros.shape)}")
    q = unpack_int32(qweight, dim=0)
    in_order = torch.arange(k) // group_size
    g_idx = parts.get("g_idx")
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), in_order):
        # act-order: columns quantized in another order; sorted by group they are contiguous groups again,
        # and the layer reads its input in that order (x[:, perm])
        perm = torch.argsort(g_idx.long(), stable=True)
        _check(prefix, torch.equal(g_idx.long()[perm], in_order), "g_idx does not put group_size columns in each group")
        q = q[perm]
    zeros = unpack_int32(qzeros, dim=1)
    if config.get("checkpoint_format", "gptq") == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1
    return _grouped(q, zeros, scales) + (group_size, perm)


def awq_layer(prefix: str, parts: dict[str, torch.Tensor], config: dict):
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    k, n = qweight.shape[0], qweight.shape[1] * 8
    group_size = config["group_size"]
    num_groups = -(-k // group_size)
    _check(prefix, tuple(scales.shape) == (num_groups, n),
           f"scales {tuple(scales.shape)} for {k} inputs in groups of {group_size} and {n} outputs")
    _check(prefix, tuple(qzeros.shape) == (num_groups, n // 8), f"qzeros {tuple(qzeros.shape)}")

    def columns(packed: torch.Tensor) -> torch.Tensor:
        slots = unpack_int32(packed, dim=1).view(packed.shape[0], -1, 8)
        return slots[..., list(AWQ_COLUMN_SLOT)].reshape(packed.shape[0], -1)

    return _grouped(columns(qweight), columns(qzeros), scales) + (group_size, None)


def check_config(method: str, config: dict) -> None:
    if config.get("bits") != 4:
        raise ValueError(f"{method} checkpoint with bits={config.get('bits')}: genserve serves 4-bit {method}")
    if method == "awq":
        if str(config.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"AWQ version {config.get('version')!r}: genserve reads the GEMM packing only")
        if not config.get("zero_point", True):
            raise ValueError("AWQ without zero points is not supported")


def converted_tensors(files: list[Path], method: str, config: dict) -> tuple[dict[str, torch.Tensor], int, dict]:
    """Every tensor of a GPTQ / AWQ checkpoint, its quantized linears as X.weight / X.weight_scale / X.weight_min;
    the group size; {X: input column order} for act-order layers."""
    check_config(method, config)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        prefix, _, part = name.rpartition(".")
        if part in QUANTIZED_PARTS:
            layers[prefix][part] = tensor
        else:
            out[name] = tensor
    if not layers:
        raise ValueError(f"checkpoint's quantization_config says {method} but no tensor holds qweight/scales")
    group_sizes, perms = set(), {}
    for prefix, parts in layers.items():
        missing = [p for p in ("qweight", "qzeros", "scales") if p not in parts]
        _check(prefix, not missing, f"missing {', '.join(missing)}")
        convert = gptq_layer if method == "gptq" else awq_layer
        qweight, scale, mins, group_size, perm = convert(prefix, parts, config)
        if perm is not None:
            perms[prefix] = perm
        out[f"{prefix}.weight"], out[f"{prefix}.weight_scale"], out[f"{prefix}.weight_min"] = qweight, scale, mins
        group_sizes.add(group_size)
    _check("group_size", len(group_sizes) == 1, f"layers quantized with different group sizes {group_sizes}")
    return out, group_sizes.pop(), perms


def _layer_formats(model: nn.Module, tensors: dict[str, torch.Tensor], packed: dict) -> dict[str, set]:
    """Module name -> {(bits, scale dtype)} over the checkpoint tensors it takes."""
    formats: dict[str, set] = defaultdict(set)
    for name, tensor in tensors.items():
        if name.endswith(".weight_scale"):
            base = name.removesuffix("_scale")
            bits = 4 if tensors[base].dtype == torch.uint8 else 8
            formats[_map_name(base, packed)[0].removesuffix(".weight")].add((bits, tensor.dtype))
    return formats


def _dequantize_parts(tensors: dict[str, torch.Tensor], module: str, packed: dict, group_size: int) -> None:
    """Parts of one fused layer disagree (some quantized, some float): serve the layer in float."""
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        base = name.removesuffix("_scale")
        if _map_name(base, packed)[0] == f"{module}.weight":
            tensors[base] = dequantize(tensors.pop(base), tensors.pop(name), tensors.pop(base + "_min"), group_size)


@torch.no_grad()
def load_quantized_checkpoint(model: nn.Module, model_dir: Path, dtype: torch.dtype | None = None) -> bool:
    """Load a GPTQ / AWQ / GGUF-derived checkpoint into grouped weights; False for a float checkpoint."""
    model_dir = Path(model_dir)
    refuse_pickles(model_dir)
    config = quantization_config(model_dir)
    if config is None:
        return False
    method = str(config.get("quant_method", "")).lower()
    files = sorted(model_dir.glob("*.safetensors"))
    if method == "gguf":
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(load_file(str(file)))
        group_size, perms = config["group_size"], {}
    elif method in ("gptq", "awq"):
        tensors, group_size, perms = converted_tensors(files, method, config)
    else:
        raise ValueError(f"checkpoint quantized with {method!r} (its quantization_config): genserve serves "
                         f"gptq, awq and gguf checkpoints")
    packed = getattr(model, "packed_modules_mapping", {})
    modules = dict(model.named_modules())
    for module, formats in _layer_formats(model, tensors, packed).items():
        layer = modules.get(module)
        if isinstance(layer, VocabParallelEmbedding) and len(formats) == 1:
            _prepare_vocabulary(model, layer, *next(iter(formats)), group_size)
            continue
        if not isinstance(layer, LinearBase):
            raise ValueError(f"quantized tensors for {module}, which is not a linear layer of {type(model).__name__}")
        if len(formats) > 1 or any(f"{module}.weight" == _map_name(n, packed)[0] and t.is_floating_point()
                                   for n, t in tensors.items() if n.endswith(".weight")):
            logger.warning("%s: parts quantized differently; served dequantized", module)
            _dequantize_parts(tensors, module, packed, group_size)
            continue
        (bits, scale_dtype), = formats
        grouped_linear.prepare_for_loading(layer, bits, group_size, scale_dtype)
        _set_input_order(layer, module, perms, packed)
    load_named_tensors(model, tensors.items(), model_dir)
    model.checkpoint_quantization = method
    layers = grouped_linear.grouped_layers(model)
    logger.info("%s checkpoint: %d linear layers kept quantized (groups of %d)", method, len(layers), group_size)
    grouped_linear.choose_kernels(model, dtype or getattr(model, "dtype", torch.float32))
    return True


def _prepare_vocabulary(model: nn.Module, layer: VocabParallelEmbedding, bits: int, scale_dtype: torch.dtype,
                        group_size: int) -> None:
    """A GGUF file's token_embd / output blocks: the embedding (and the LM head tied to it) holds them as they are."""
    layer.prepare_grouped(bits, group_size, scale_dtype)
    head = getattr(model, "head", None)
    body = getattr(model, "body", None)
    if getattr(model, "tie_word_embeddings", False) and body is not None and layer is body.embedding():
        head.tie_to(layer)


def _set_input_order(layer: LinearBase, module: str, perms: dict, packed: dict) -> None:
    """Act-order: the layer reads its input permuted; every part of a fused layer must share the order."""
    mine = [perm for prefix, perm in perms.items() if _map_name(f"{prefix}.weight", packed)[0] == f"{module}.weight"]
    if not mine:
        return
    expected = len(set(shard for part, shard in packed.values() if module.endswith(f".{part}"))) or 1
    if len(mine) != expected or any(not torch.equal(mine[0], perm) for perm in mine):
        raise ValueError(f"{module}: act-order parts with different input column orders cannot be fused")
    if isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
        raise ValueError(f"{module}: act-order (desc_act) GPTQ weights under tensor parallelism are not supported "
                         f"(a row-parallel shard would need input columns held by other ranks)")
    layer.quant_method.input_order = mine[0]
