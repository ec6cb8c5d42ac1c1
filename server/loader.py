"""Load HF safetensors into a model whose parameters carry `weight_loader` (each rank reads its own shard)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Copy every tensor of `model_dir/*.safetensors` into `model`; raise on missing or unexpected weights."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    packed = getattr(model, "packed_modules_mapping", {})
    is_tied = getattr(model, "tie_word_embeddings", False)
    params = dict(model.named_parameters())
    loaded: dict[str, set] = defaultdict(set)
    unexpected = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES) or (is_tied and name == "lm_head.weight"):
                    continue
                param_name, shard_id = _map_name(name, packed)
                param = params.get(param_name)
                if param is None:
                    unexpected.append(name)
                    continue
                weight_loader = getattr(param, "weight_loader", default_weight_loader)
                weight_loader(param, f.get_slice(name), shard_id)
                loaded[param_name].add(shard_id)
    missing = [f"{name}{'' if shard is None else f' (shard {shard})'}"
               for name in params for shard in sorted(_expected_shards(name, packed) - loaded[name], key=str)]
    if unexpected or missing:
        raise ValueError(f"checkpoint {model_dir} does not match {type(model).__name__}: "
                         f"missing {missing or 'none'}; unexpected {unexpected or 'none'}")
