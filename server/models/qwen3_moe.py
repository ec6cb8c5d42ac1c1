"""Qwen3-MoE: Qwen3's attention and layers with a sparse MoE block as the MLP of every `decoder_sparse_step`-th
layer not in `mlp_only_layers` (those keep a dense MLP): softmax, top-k, renormalised iff `norm_topk_prob`."""

from __future__ import annotations

import torch
from torch import nn

from genserve.server.layers.moe import SparseMoeBlock, expert_checkpoint_mapping, qwen3_moe_routing
from genserve.server.models.common import CausalLM
from genserve.server.models.llama import LlamaMLP
from genserve.server.models.qwen3 import Qwen3ForCausalLM, qwen3_body


def is_sparse_layer(config, layer_idx: int) -> bool:
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


def moe_or_dense_mlp(config, layer_idx: int) -> nn.Module:
    if not is_sparse_layer(config, layer_idx):
        return LlamaMLP(config)
    return SparseMoeBlock(config.hidden_size, config.num_experts, config.moe_intermediate_size,
                          qwen3_moe_routing(config), config.hidden_act)


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, config, dtype: torch.dtype | None = None) -> None:
        super().__init__(config, dtype)
        # experts first: `experts.N.gate_proj` must not fall through to the dense `gate_proj` entry
        self.packed_modules_mapping = {
            **expert_checkpoint_mapping(config.num_experts, ("gate_proj", "up_proj", "down_proj")),
            **Qwen3ForCausalLM.packed_modules_mapping,
        }

    def build_body(self, config) -> nn.Module:
        return qwen3_body(config, make_mlp=moe_or_dense_mlp)


ARCHITECTURES = {"Qwen3MoeForCausalLM": Qwen3MoeForCausalLM}
