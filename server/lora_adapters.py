"""LoRA adapters in PEFT format (`adapter_config.json` + `adapter_model.safetensors`): the `--lora-adapters`
list, each folder checked once against the served model, and the registry that names them.

Checks, each a one-line ValueError: a missing or unreadable file, a rank above `--max-lora-rank`, a target
module the base model lacks, tensors whose shapes do not fit the base (an adapter for another base model),
and PEFT features a LoRA product cannot express (DoRA, trained biases, `modules_to_save`).
A different `base_model_name_or_path` alone only warns, as TGI does when the architectures agree.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT module names a Llama-layout layer has; q/k/v and gate/up live in fused layers (packed_modules_mapping)
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True, slots=True)
class AdapterSource:
    name: str
    source: str  # a local folder or a Hub id


def parse_lora_adapters(spec: str | None) -> list[AdapterSource]:
    """`--lora-adapters name=path,hub/id,...` (TGI's flag): `name=path` serves a folder under `name`;
    a bare entry is a folder or Hub id served under its own string."""
    out: list[AdapterSource] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, source = part.partition("=")
        name, source = (name.strip(), source.strip()) if sep else (part, part)
        if not name or not source:
            raise ValueError(f"`--lora-adapters` entries are name=path or a Hub id; got {part!r}")
        if any(a.name == name for a in out):
            raise ValueError(f"`--lora-adapters` names adapter {name!r} twice")
        out.append(AdapterSource(name, source))
    return out


def module_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module of a Llama-layout layer, unsharded."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    hidden, inter = hf_config.hidden_size, getattr(hf_config, "intermediate_size", None)
    q, kv = hf_config.num_attention_heads * head_dim, getattr(hf_config, "num_key_value_heads", None)
    kv = (kv or hf_config.num_attention_heads) * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def _normalized(model_name: str | None) -> str:
    """`org/Model` and `/cache/models/Model` (or a Hub cache snapshot) name the same base."""
    if not model_name:
        return ""
    parts = [p for p in str(model_name).rstrip("/").split("/") if p]
    if "snapshots" in parts:  # .../models--org--Model/snapshots/<sha>
        repo = parts[parts.index("snapshots") - 1]
        return repo.removeprefix("models--").split("--")[-1].lower()
    return parts[-1].lower() if parts else ""


@dataclass(slots=True)
class LoRAAdapter:
    """One checked adapter: where its weights are and what they change; no tensors (see lora_store.py)."""

    name: str
    path: Path
    rank: int  # the largest rank over its modules
    targets: tuple[str, ...]  # PEFT module names it adapts
    scales: dict[str, float]  # per target: lora_alpha / r (rsLoRA: / sqrt(r))
    base_model: str | None
    index: int = 0  # the registry's number for it (never reused)


def resolve_source(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source.startswith("."):
        raise ValueError(f"LoRA adapter folder {source} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except Exception as e:  # offline, unknown repo, gated: one line, not huggingface_hub's traceback
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"LoRA adapter {source}: not a local folder, and the Hub download failed ({reason})") from None


def _read_config(name: str, path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"LoRA adapter {name!r}: {CONFIG_FILE} is missing in {path}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not valid JSON ({e}) in {path}") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not a JSON object in {path}")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise ValueError(f"LoRA adapter {name!r}: DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported")
    if config.get("modules_to_save"):
        raise ValueError(f"LoRA adapter {name!r}: modules_to_save {config['modules_to_save']} (full copies of "
                         "base modules) are not supported")
    if config.get("lora_bias") or config.get("trainable_token_indices"):
        raise ValueError(f"LoRA adapter {name!r}: lora_bias / trainable_token_indices are not supported")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"LoRA adapter {name!r}: fan_in_fan_out (Conv1D bases) is not supported")
    return config


def _read_shapes(name: str, path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        bin_hint = " (adapter_model.bin is not read: convert it to safetensors)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise ValueError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} is missing in {path}{bin_hint}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a bad header
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} is not a readable safetensors file ({reason}) "
                         f"in {path}") from None


def _alpha(config: dict, target: str) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", target) or pattern == target:
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def check_adapter(name: str, path: Path, hf_config, served_model: str | None, max_rank: int,
                  supported: tuple[str, ...] = TARGET_MODULES) -> LoRAAdapter:
    """Read and check one adapter folder against the served model; one-line ValueError when it cannot serve."""
    config = _read_config(name, path)
    shapes = _read_shapes(name, path)
    base = config.get("base_model_name_or_path")
    expected = module_shapes(hf_config)
    ranks: dict[str, int] = {}
    seen: set[tuple[int, str, str]] = set()
    for key, shape in shapes.items():
        match = _KEY.match(key)
        if match is None:
            module = key.removesuffix(".weight").split(".")[-2] if key.count(".") >= 2 else key
            raise ValueError(f"LoRA adapter {name!r}: tensor {key} adapts {module!r}, which the served model does "
                             f"not have as a LoRA target (it has {', '.join(supported)})")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if module not in supported:
            raise ValueError(f"LoRA adapter {name!r}: target module {module!r} is not in the served model "
                             f"(LoRA targets: {', '.join(supported)})")
        if layer >= hf_config.num_hidden_layers:
            raise ValueError(f"LoRA adapter {name!r}: {key} is for layer {layer}, but the served model "
                             f"{served_model} has {hf_config.num_hidden_layers} layers (trained on {base}?)")
        in_features, out_features = expected[module]
        rank = shape[0] if which == "A" else shape[-1]
        want = (rank, in_features) if which == "A" else (out_features, rank)
        if len(shape) != 2 or tuple(shape) != want:
            raise ValueError(f"LoRA adapter {name!r}: {key} has shape {list(shape)}, the served model {served_model} "
                             f"needs {list(want)}: the adapter was trained on another base model ({base})")
        if ranks.setdefault(module, rank) != rank:
            raise ValueError(f"LoRA adapter {name!r}: {module} has ranks {ranks[module]} and {rank} in different "
                             "layers or between lora_A and lora_B")
        seen.add((layer, module, which))
    if not seen:
        raise ValueError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no lora_A / lora_B tensors")
    unpaired = [f"layer {layer} {module}" for layer, module, which in seen
                if (layer, module, "B" if which == "A" else "A") not in seen]
    if unpaired:
        raise ValueError(f"LoRA adapter {name!r}: lora_A without lora_B (or the reverse) at {unpaired[0]}")
    rank = max(ranks.values())
    if rank > max_rank:
        raise ValueError(f"LoRA adapter {name!r} has rank {rank}, above --max-lora-rank {max_rank}")
    if base and served_model and _normalized(base) != _normalized(served_model):
        logger.warning("LoRA adapter %r was trained on %s, not on the served model %s; its shapes fit, so it is "
                       "served (as TGI does for the same architecture)", name, base, served_model)
    rslora = bool(config.get("use_rslora"))
    scales = {m: _alpha(config, m) / (math.sqrt(r) if rslora else r) for m, r in ranks.items()}
    targets = tuple(m for m in supported if m in ranks)
    return LoRAAdapter(name, path, rank, targets, scales, base)


@dataclass
class AdapterRegistry:
    """The served adapters by name; index 0 is the base model. Indices are never reused, so an adapter loaded
    again under an old name never meets the first one's KV blocks or resident weights."""

    base_model: str | None = None
    max_loras: int = 1
    adapters: dict[int, LoRAAdapter] = field(default_factory=dict)  # by index, unloaded ones kept (see remove)
    by_name: dict[str, int] = field(default_factory=dict)
    next_index: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def add(self, adapter: LoRAAdapter) -> LoRAAdapter:
        with self.lock:
            if adapter.name in self.by_name:
                raise ValueError(f"The lora adapter '{adapter.name}' has already been loaded.")
            adapter.index = self.next_index
            self.next_index += 1
            self.adapters[adapter.index] = adapter
            self.by_name[adapter.name] = adapter.index
        return adapter

    def remove(self, name: str) -> LoRAAdapter:
        """Stop serving `name`; requests already running keep its weights until they finish."""
        with self.lock:
            if name not in self.by_name:
                raise KeyError(name)
            return self.adapters[self.by_name.pop(name)]

    def get(self, index: int) -> LoRAAdapter | None:
        return self.adapters.get(index)

    def index_of(self, adapter_id: str | None) -> int:
        """0 for the base model (no id, or the served model's own id); ValueError for an unknown adapter."""
        if not adapter_id or adapter_id == self.base_model:
            return 0
        index = self.by_name.get(adapter_id)
        if index is None:
            served = ", ".join(self.by_name) or "none"
            raise ValueError(f"Adapter '{adapter_id}' is not loaded (adapters: {served}; the base model is "
                             f"'{self.base_model}')")
        return index


def load_registry(spec: str | None, hf_config, served_model: str | None, max_loras: int,
                  max_rank: int) -> AdapterRegistry:
    """Every `--lora-adapters` entry fetched (Hub ids) and checked, in order; the first bad one raises."""
    registry = AdapterRegistry(base_model=served_model, max_loras=max_loras)
    for source in parse_lora_adapters(spec):
        if source.name == served_model:
            raise ValueError(f"LoRA adapter name {source.name!r} is the served model's own id; name it otherwise")
        path = resolve_source(source.source)
        registry.add(check_adapter(source.name, path, hf_config, served_model, max_rank))
        logger.info("LoRA adapter %r from %s", source.name, path)
    return registry


@dataclass(slots=True)
class AdapterStats:
    num_running: int = 0
    num_waiting: int = 0
    num_generation_tokens_total: int = 0


def adapter_stats(registry: AdapterRegistry, tokens: dict[int, int], running, waiting) -> dict[str, AdapterStats]:
    """/metrics per adapter name: requests running and waiting (scheduler Requests), tokens generated."""
    if not registry.adapters:
        return {}
    by_index = {i: AdapterStats(num_generation_tokens_total=n) for i, n in tokens.items()}
    for requests, is_running in ((running, True), (waiting, False)):
        for r in list(requests):
            if r.adapter_index:
                stats = by_index.setdefault(r.adapter_index, AdapterStats())
                stats.num_running += is_running
                stats.num_waiting += not is_running
    with registry.lock:
        served = list(registry.by_name.values())
    for index in served:
        by_index.setdefault(index, AdapterStats())
    out = {}
    for index, stats in sorted(by_index.items()):
        adapter = registry.get(index)
        if adapter is not None:
            out[adapter.name] = stats
    return out
