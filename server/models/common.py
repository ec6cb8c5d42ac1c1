"""Pieces the decoder-only families share: the model dtype and each layer's window, Llama's pre-norm layer and
layer stack, the causal-LM shell (vocab-parallel LM head, tied embeddings, final logit soft-capping), and loading
fused or transposed checkpoint tensors."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from genserve.server.distributed import get_tp_size
from genserve.server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.server.layers.norm import RMSNorm
from genserve.server.layers.rotary import RotaryEmbedding


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The sliding window of layer `layer_idx`, as transformers decides it: `layer_types` where the config
    has them (Qwen2 derives them from use_sliding_window and max_window_layers), else `sliding_window`
    for every layer (Mistral; null there means full attention)."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


class PreNormDecoderLayer(nn.Module):
    """Llama's layer: attention, then the MLP, each behind an RMSNorm that also adds the residual stream.

    mlp_name: the MLP's checkpoint name (`mlp`; Mixtral's sparse block is `block_sparse_moe`)."""

    def __init__(self, config, self_attn: nn.Module, mlp: nn.Module, mlp_name: str = "mlp") -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self._modules[self.mlp_name](hidden), residual


LayerFactory = Callable[[object, int, RotaryEmbedding], nn.Module]


class PreNormModel(nn.Module):
    """Embeddings, `num_hidden_layers` layers from `make_layer(config, layer_idx, rotary_emb)` sharing one
    cos/sin cache, and the final RMSNorm (which adds the last residual)."""

    def __init__(self, config, make_layer: LayerFactory) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(config, head_dim_of(config))
        self.layers = nn.ModuleList(make_layer(config, i, rotary_emb) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fused_decode = None  # models/fused_decode.py's one-call decode step, set by the runner where it fits

    def embedding(self) -> VocabParallelEmbedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if self.fused_decode is not None and (fused := self.fused_decode(hidden, positions)) is not None:
            return fused
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


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
