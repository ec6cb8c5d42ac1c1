"""Pieces the decoder-only families share: the window of each layer (llama.py's), the causal-LM shell (model dtype,
vocab-parallel LM head, tied embeddings, final logit soft-capping), loading fused or transposed checkpoint tensors."""

from __future__ import annotations

import torch
from torch import nn

from genserve.server.distributed import get_tp_size
from genserve.server.layers.embedding import ParallelLMHead
from genserve.server.models.llama import config_dtype, default_dtype, layer_sliding_window  # noqa: F401 (shared)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class CausalLM(nn.Module):
    """A body (`body_name`, built by `build_body`) whose `embedding()` feeds it, and an LM head (`head_name`).

    Subclasses name the attributes after the checkpoint (model/lm_head, transformer/lm_head, gpt_neox/embed_out)
    so checkpoint names need no renaming."""

    body_name = "model"
    head_name = "lm_head"
    packed_modules_mapping: dict = {}

    def __init__(self, config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype or config_dtype(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.tp_size = get_tp_size()
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)
        with default_dtype(self.dtype):
            setattr(self, self.body_name, self.build_body(config))
            setattr(self, self.head_name, ParallelLMHead(config.vocab_size, config.hidden_size))
        if self.tie_word_embeddings:
            self.head.weight = self.body.embedding().weight

    def build_body(self, config) -> nn.Module:
        raise NotImplementedError

    @property
    def body(self) -> nn.Module:
        return getattr(self, self.body_name)

    @property
    def head(self) -> ParallelLMHead:
        return getattr(self, self.head_name)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] for all sequences' new tokens, flat -> hidden [T, hidden]."""
        return self.body(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] rows that need a next token -> logits [N, vocab] in the model dtype."""
        return softcap(self.head(hidden), self.final_logit_softcap)


class CheckpointView:
    """Rows [offset, offset + num_rows) of a checkpoint tensor or safetensors slice, indexed as the linear loaders
    index a whole one (`loaded[a:b]`, `loaded[:, a:b]`), so each rank still reads only its shard of a fused tensor.

    transposed: the checkpoint stores [in, out] (GPT-2's Conv1D); rows are then its columns."""

    def __init__(self, loaded, offset: int, num_rows: int, transposed: bool = False) -> None:
        self.loaded, self.offset, self.num_rows, self.transposed = loaded, offset, num_rows, transposed

    def _rows(self, key: slice) -> slice:
        assert key.step is None, "strided loads are not supported"
        start = 0 if key.start is None else key.start
        stop = self.num_rows if key.stop is None else min(key.stop, self.num_rows)
        return slice(self.offset + start, self.offset + stop)

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, None)
        rows = self._rows(rows)
        if self.transposed:
            return self.loaded[slice(None) if cols is None else cols, rows].t()
        return self.loaded[rows] if cols is None else self.loaded[rows, cols]


def load_fused(param: nn.Parameter, parts: list[tuple[object, int]], transposed: bool = False) -> None:
    """Make `param` load a checkpoint tensor that holds its shards one after another: parts [(shard_id, rows)]."""
    load_part = param.weight_loader

    def weight_loader(target: nn.Parameter, loaded, shard_id=None) -> None:
        offset = 0
        for part_id, num_rows in parts:
            load_part(target, CheckpointView(loaded, offset, num_rows, transposed), part_id)
            offset += num_rows

    param.weight_loader = weight_loader


def add_prefix(name: str, prefix: str, unprefixed: tuple[str, ...] = ("lm_head.",)) -> str:
    """Checkpoints saved from the bare body (GPT-2, BLOOM on the Hub) name its tensors without `prefix`."""
    return name if name.startswith(prefix) or name.startswith(unprefixed) else prefix + name
