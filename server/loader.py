"""Load HF safetensors into a model whose parameters carry `weight_loader` (each rank reads its own shard),
or fill it with random weights (`--load-format dummy`)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DUMMY_SEED = 0
DUMMY_RANGE = 1e-3


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    tensor = loaded[:]
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"weight shape {tuple(tensor.shape)} does not fit parameter shape {tuple(param.shape)}")
    param.data.copy_(tensor)


def _map_name(name: str, packed: dict) -> tuple[str, object]:
    for checkpoint_part, (param_part, shard_id) in packed.items():
        if f".{checkpoint_part}." in name:
            return name.replace(f".{checkpoint_part}.", f".{param_part}."), shard_id
    return name, None


def _expected_shards(param_name: str, packed: dict) -> set:
    shards = {shard_id for param_part, shard_id in packed.values() if f".{param_part}." in param_name}
    return shards or {None}


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = DUMMY_SEED) -> None:
    """Fill each rank's local parameters in place: norms 1 and their biases 0, everything else U(-1e-3, 1e-3).

    Values are vLLM's: small enough for finite activations at any depth, and the norms keep every layer's
    input at unit scale, so logits stay finite and distinct. One seed per parameter (in model order) keeps
    replicated parameters equal across tensor-parallel ranks.
    """
    norms = {id(p): name for m in model.modules() if "norm" in type(m).__name__.lower()
             for name, p in m.named_parameters(recurse=False)}
    for index, param in enumerate(model.parameters()):
        if id(param) in norms:
            param.data.fill_(1.0 if norms[id(param)] == "weight" else 0.0)
            continue
        generator = torch.Generator(device=param.device).manual_seed(seed + index)
        param.data.uniform_(-DUMMY_RANGE, DUMMY_RANGE, generator=generator)


@torch.no_grad()
def load_weights(model: nn.Module, model_dir: str | Path, load_format: str = "auto") -> None:
    """Copy every tensor of `model_dir/*.safetensors` into `model`; raise on missing or unexpected weights.

    With load_format "dummy", fill random weights instead (`model_dir` is not read).
    """
    if load_format == "dummy":
        init_dummy_weights(model)
        return
    from genserve.server.quant_formats import load_quantized_checkpoint

    if load_quantized_checkpoint(model, model_dir):  # GPTQ / AWQ / GGUF: weights stay quantized
        return
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir} (--load-format dummy serves random weights)")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(file), framework="pt", device="cpu")) for file in files]
        load_named_tensors(model, ((name, f.get_slice(name)) for f in handles for name in f.keys()), model_dir)


@torch.no_grad()
def load_named_tensors(model: nn.Module, named: Iterable[tuple[str, object]], source) -> None:
    """Hand every (checkpoint name, tensor or safetensors slice) to its parameter's weight_loader; raise naming
    `source` on missing or unexpected weights. The model may rename a checkpoint tensor or skip it
    (`checkpoint_name` returning None: GPT-2's saved causal masks)."""
    packed = getattr(model, "packed_modules_mapping", {})
    is_tied = getattr(model, "tie_word_embeddings", False)
    params = dict(model.named_parameters())
    rename = getattr(model, "checkpoint_name", None) or (lambda name: name)
    loaded: dict[str, set] = defaultdict(set)
    unexpected = []
    for name, tensor in named:
        target = rename(name)
        if target is None or target.endswith(IGNORED_SUFFIXES) or (is_tied and target == "lm_head.weight"):
            continue
        param_name, shard_id = _map_name(target, packed)
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        if isinstance(tensor, torch.Tensor) and param.is_floating_point() and tensor.is_floating_point():
            tensor = tensor.to(param.dtype)
        getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard_id)
        loaded[param_name].add(shard_id)
    missing = [f"{name}{'' if shard is None else f' (shard {shard})'}"
               for name in params for shard in sorted(_expected_shards(name, packed) - loaded[name], key=str)]
    if unexpected or missing:
        raise ValueError(f"checkpoint {source} does not match {type(model).__name__}: "
                         f"missing {missing or 'none'}; unexpected {unexpected or 'none'}")
