"""Mixtral: Mistral's attention (Llama's, with its sliding window) and a sparse MoE block in place of the MLP:
softmax over all experts, top-k, renormalised (layers/moe.py)."""

from __future__ import annotations

import torch
from torch import nn

from genserve.server.layers.embedding import VocabParallelEmbedding
from genserve.server.layers.moe import SparseMoeBlock, expert_checkpoint_mapping, mixtral_routing
from genserve.server.layers.norm import RMSNorm
from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import CausalLM, layer_sliding_window
from genserve.server.models.llama import LlamaAttention, head_dim_of


class MixtralDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, layer_sliding_window(config, layer_idx))
        self.block_sparse_moe = SparseMoeBlock(config.hidden_size, config.num_local_experts, config.intermediate_size,
                                               mixtral_routing(config), config.hidden_act)
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
        return self.block_sparse_moe(hidden), residual


class MixtralModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(config, head_dim_of(config))
        self.layers = nn.ModuleList(MixtralDecoderLayer(config, i, rotary_emb) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embedding(self) -> VocabParallelEmbedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class MixtralForCausalLM(CausalLM):
    def __init__(self, config, dtype: torch.dtype | None = None) -> None:
        super().__init__(config, dtype)
        # experts first: their names must not fall through to a shorter entry
        self.packed_modules_mapping = {
            **expert_checkpoint_mapping(config.num_local_experts, ("w1", "w3", "w2")),
            "q_proj": ("qkv_proj", "q"),
            "k_proj": ("qkv_proj", "k"),
            "v_proj": ("qkv_proj", "v"),
        }

    def build_body(self, config) -> nn.Module:
        return MixtralModel(config)


ARCHITECTURES = {"MixtralForCausalLM": MixtralForCausalLM}
