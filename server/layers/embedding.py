"""Vocabulary-sharded embedding and LM head: rank r holds token rows [r * V/tp, (r+1) * V/tp), padded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.server.distributed import all_gather, all_reduce, get_tp_rank, get_tp_size
from genserve.server.layers.cpu_packing import pack_weight, packed_linear, should_pack


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.num_embeddings = num_embeddings
        # the last rank's padding rows stay zero and are never selected (embedding) or cut off (logits)
        self.num_embeddings_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_rank
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        rows = self.vocab_end - self.vocab_start
        shard = loaded[self.vocab_start:self.vocab_end]
        if tuple(shard.shape) != (rows, param.shape[1]):
            raise ValueError(f"embedding shard shape {tuple(shard.shape)} does not fit ({rows}, {param.shape[1]})")
        param.data[:rows].copy_(shard)
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        is_local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * is_local
        out = F.embedding(local_ids, self.weight) * is_local.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.packed_weight: torch.Tensor | None = None

    def pack_for_cpu(self) -> bool:
        """A packed copy for the matmul; the plain weight stays (tied embeddings look rows up in it)."""
        if not should_pack(self.weight):
            return False
        self.packed_weight = pack_weight(self.weight)
        return True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] only the rows that need logits -> [N, vocab]
        if self.packed_weight is not None:
            logits = packed_linear(hidden, self.packed_weight, None)
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        return all_gather(logits, dim=-1)[:, :self.num_embeddings]
