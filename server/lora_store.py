"""Which adapters' weights are on the device: at most `--max-loras`, least recently used out first, read from
the adapter folder again when a request needs one that is not resident. Every rank keeps its own store and
sees the same steps, so all ranks hold the same adapters."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from genserve.server.layers.lora import Target, attach_lora, build_deltas
from genserve.server.lora_adapters import _KEY, TARGET_MODULES, WEIGHTS_FILE, AdapterRegistry, LoRAAdapter

logger = logging.getLogger(__name__)


class LoRAStore:
    def __init__(self, model: nn.Module, registry: AdapterRegistry, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.registry = registry
        self.dtype, self.device = dtype, device
        self.targets: dict[tuple[int, str], Target] = attach_lora(model, TARGET_MODULES)
        self.loras = {lora for lora, _ in self.targets.values()}
        self.resident: OrderedDict[int, None] = OrderedDict()
        for adapter in registry.adapters.values():
            self.check_targets(adapter)

    def check_targets(self, adapter: LoRAAdapter) -> None:
        """ValueError when the adapter targets a module this model does not have (Mixtral's experts, say)."""
        have = {module for _, module in self.targets}
        missing = [m for m in adapter.targets if m not in have]
        if missing:
            raise ValueError(f"LoRA adapter {adapter.name!r}: target module {missing[0]!r} is not in the served "
                             f"model (it has {', '.join(sorted(have)) or 'no LoRA targets'})")

    def ensure(self, indices: set[int]) -> None:
        """Make the step's adapters resident; evict the least recently used beyond `max_loras` (and unloaded
        adapters no step needs any more)."""
        for index in indices:
            if index in self.resident:
                self.resident.move_to_end(index)
            else:
                self._load(index)
        with self.registry.lock:
            served = set(self.registry.by_name.values())
        for index in list(self.resident):
            if index not in indices and (len(self.resident) > self.registry.max_loras or index not in served):
                self._evict(index)

    def _load(self, index: int) -> None:
        from safetensors.torch import load_file

        adapter = self.registry.get(index)
        assert adapter is not None, f"adapter index {index} was never registered"
        tensors = load_file(str(adapter.path / WEIGHTS_FILE))
        weights: dict[tuple[int, str], list] = {}
        for key, tensor in tensors.items():
            match = _KEY.match(key)
            pair = weights.setdefault((int(match.group(1)), match.group(2)), [None, None])
            pair[0 if match.group(3) == "A" else 1] = tensor
        deltas = build_deltas(self.targets, {k: (a, b) for k, (a, b) in weights.items()}, adapter.scales,
                              self.dtype, self.device)
        for lora, delta in deltas.items():
            lora.set_delta(index, delta)
        self.resident[index] = None
        logger.info("LoRA adapter %r resident (%d of --max-loras %d)", adapter.name, len(self.resident),
                    self.registry.max_loras)

    def _evict(self, index: int) -> None:
        for lora in self.loras:
            lora.drop_delta(index)
        del self.resident[index]
