"""Vocabulary-sharded embedding and LM head: rank r holds token rows [r * V/tp, (r+1) * V/tp), padded.

Either may hold its rows as grouped integers (grouped_weights.py's layout, 8-bit groups of 32 like GGUF's
Q8_0, or 4-bit): a GGUF file's own token_embd / output blocks, or `--quantize`. The LM head then runs
the grouped kernel (at one stream it reads the whole vocabulary per token: 108 MiB in float32 for
SmolLM2, 30 MiB in 8 bits), and the embedding dequantizes only the rows it looks up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.server.distributed import all_gather, all_reduce, get_tp_rank, get_tp_size
from genserve.server.layers.cpu_packing import pack_weight, packed_linear, should_pack
from genserve.server.layers.grouped_linear import GroupedWeights
from genserve.server.layers.grouped_weights import BLOCK, quantize_int8


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        # the last rank's padding rows stay zero and are never selected (embedding) or cut off (logits)
        self.num_embeddings_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_rank
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.float_dtype = self.weight.dtype  # what looked-up rows and logits come out as
        self.grouped: GroupedWeights | None = None  # set when the rows are held as grouped integers

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        rows = self.vocab_end - self.vocab_start
        shard = loaded[self.vocab_start:self.vocab_end]
        if tuple(shard.shape) != (rows, param.shape[1]):
            raise ValueError(f"embedding shard shape {tuple(shard.shape)} does not fit ({rows}, {param.shape[1]})")
        param.data[:rows].copy_(shard)
        param.data[rows:].zero_()

    def hold_grouped(self, qweight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group_size: int) -> None:
        """Hold this rank's rows as grouped integers (qweight, scale, min of grouped_weights.py), replacing the
        float weight; each part loads through weight_loader, sliced by rows like the float weight."""
        self.weight = nn.Parameter(qweight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.weight_min = nn.Parameter(mins, requires_grad=False)
        for param in (self.weight, self.weight_scale, self.weight_min):
            param.weight_loader = self.weight_loader
        self.grouped = GroupedWeights(self, group_size, 4 if qweight.dtype == torch.uint8 else 8)

    def prepare_grouped(self, bits: int, group_size: int, scale_dtype: torch.dtype) -> None:
        """Empty grouped parameters of this rank's shape, for a checkpoint that brings its rows quantized."""
        n, k = self.num_embeddings_per_rank, self.embedding_dim
        if k % BLOCK or group_size % BLOCK:
            raise ValueError(f"grouped embedding rows need {BLOCK}-multiples: {k} columns, groups of {group_size}")
        device = self.weight.device
        groups = -(-k // group_size)
        qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=device) if bits == 4 else \
            torch.empty(n, k, dtype=torch.int8, device=device)
        self.hold_grouped(qweight, torch.empty(n, groups, dtype=scale_dtype, device=device),
                          torch.empty(n, groups, dtype=scale_dtype, device=device), group_size)

    def quantize_int8(self, group_size: int = BLOCK) -> bool:
        """`--quantize`: this rank's float rows -> 8-bit groups (Q8_0's layout). False where the width does not
        fit the blocks (the rows then stay float)."""
        if self.grouped is not None or self.embedding_dim % BLOCK or group_size % BLOCK:
            return False
        self.hold_grouped(*quantize_int8(self.weight.data, group_size), group_size)
        return True

    def tie_to(self, other: VocabParallelEmbedding) -> None:
        """Share `other`'s rows (tied embeddings), float or grouped."""
        self.weight = other.weight
        if other.grouped is not None:
            self.weight_scale, self.weight_min = other.weight_scale, other.weight_min
            self.grouped = GroupedWeights(self, other.grouped.group_size, other.grouped.bits)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the given local ids, in the float dtype (only those rows are dequantized)."""
        if self.grouped is None:
            return F.embedding(ids, self.weight)
        rows = self.grouped.dequantized(self.float_dtype, ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.rows(input_ids)
        is_local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * is_local
        out = self.rows(local_ids)
        return all_reduce(out * is_local.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.packed_weight: torch.Tensor | None = None

    def pack_for_cpu(self) -> bool:
        """A packed copy for the matmul; the plain weight stays (tied embeddings look rows up in it)."""
        if self.grouped is not None or not should_pack(self.weight):
            return False
        self.packed_weight = pack_weight(self.weight)
        return True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] only the rows that need logits -> [N, vocab]
        if self.grouped is not None:
            logits = self.grouped.apply(hidden, self.weight, self.weight_scale, None)
        elif self.packed_weight is not None:
            logits = packed_linear(hidden, self.packed_weight, None)
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        return all_gather(logits, dim=-1)[:, :self.num_embeddings]


def quantize_vocabulary(model: nn.Module, group_size: int = BLOCK) -> bool:
    """`--quantize int8 / int4`: the embedding and LM head (once when tied) in 8-bit groups of 32, as llama.cpp
    keeps a 4-bit file's output at 8 bits or more: its rounding lands straight on the logits. False where the
    model has no vocab-parallel head (or the rows do not fit the blocks)."""
    head = getattr(model, "head", None)
    body = getattr(model, "body", None)
    if not isinstance(head, ParallelLMHead) or body is None:
        return False
    embedding = body.embedding()
    if getattr(model, "tie_word_embeddings", False) and head.weight is embedding.weight:
        if not embedding.quantize_int8(group_size):
            return False
        head.tie_to(embedding)
        return True
    return embedding.quantize_int8(group_size) | head.quantize_int8(group_size)
