"""Mixtral: Mistral's attention (Llama's, with its sliding window) and a sparse MoE block in place of the MLP:
softmax over all experts, top-k, renormalised (layers/moe.py)."""

from __future__ import annotations

import torch
from torch import nn

from genserve.server.layers.moe import SparseMoeBlock, expert_checkpoint_mapping, mixtral_routing
from genserve.server.layers.rotary import RotaryEmbedding
from genserve.server.models.common import CausalLM, PreNormDecoderLayer, PreNormModel, layer_sliding_window
from genserve.server.models.llama import LlamaAttention


def mixtral_layer(config, layer_idx: int, rotary_emb: RotaryEmbedding) -> PreNormDecoderLayer:
    attention = LlamaAttention(config, rotary_emb, layer_sliding_window(config, layer_idx))
    moe = SparseMoeBlock(config.hidden_size, config.num_local_experts, config.intermediate_size,
                         mixtral_routing(config), config.hidden_act)
    return PreNormDecoderLayer(config, attention, moe, mlp_name="block_sparse_moe")


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
        return PreNormModel(config, mixtral_layer)


ARCHITECTURES = {"MixtralForCausalLM": MixtralForCausalLM}
