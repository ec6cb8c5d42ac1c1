"""Mixture of experts: top-k routing as each family defines it, and experts computed grouped by expert.

Tensor parallelism shards every expert like a dense MLP: rank r holds rows [r * I/tp, (r+1) * I/tp) of
each expert's gate and up projections and the same columns of its down projection, so each rank
computes a partial sum for every routed token and one all-reduce per layer adds them (the router is
replicated). Simplest correct; expert parallelism would move tokens instead of weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genserve.server.distributed import all_reduce, get_tp_rank, get_tp_size
from genserve.server.layers.activation import gated_activation


@dataclass(frozen=True, slots=True)
class Routing:
    """How a family turns router logits into (weights, experts) per token.

    topk_first False: softmax over all experts, then the top k (Mixtral, Qwen2/3-MoE);
    True: the top k logits, then a softmax over those k alone. renormalize: scale the chosen k
    probabilities to sum to 1 (Mixtral always; Qwen3-MoE iff `norm_topk_prob`). The softmax is in
    float32; weights_in_model_dtype casts the weights back before they scale the experts (Qwen3-MoE).
    """

    top_k: int
    renormalize: bool
    topk_first: bool = False
    weights_in_model_dtype: bool = False


def mixtral_routing(config) -> Routing:
    return Routing(config.num_experts_per_tok, renormalize=True)


def qwen3_moe_routing(config) -> Routing:
    return Routing(config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob), weights_in_model_dtype=True)


def route(router_logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k], expert ids [T, k])."""
    if routing.topk_first:
        top_logits, expert_ids = torch.topk(router_logits.float(), routing.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
    else:
        weights, expert_ids = torch.topk(router_logits.float().softmax(dim=-1), routing.top_k, dim=-1)
        if routing.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    if routing.weights_in_model_dtype:
        weights = weights.to(router_logits.dtype)
    return weights, expert_ids


def grouped_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                    expert_ids: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; weights, expert_ids [T, k] -> [T, H].

    The T * k (token, expert) pairs are sorted by expert, so each expert that any token chose runs one
    gate|up and one down matmul over all its tokens; results are weighted and summed back per token.
    """
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)  # [T * k] pair indices, grouped by expert, tokens in order
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    token_of = order // top_k
    sorted_x = x[token_of]
    out = torch.empty_like(sorted_x)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            out[rows] = F.linear(act(F.linear(sorted_x[rows], w13[expert])), w2[expert])
            start += count
    scaled = out * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token_of, scaled.to(x.dtype))


def masked_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                   expert_ids: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """grouped_experts without reading the routing on the host (a CUDA graph capture cannot): every expert
    runs over every token, weighted by what the token gave it (0 if it did not choose it). Decode batches
    read each expert's weights once either way."""
    out = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        share = (weights * (expert_ids == expert)).sum(dim=-1, keepdim=True)  # [T, 1]
        out += (F.linear(act(F.linear(x, w13[expert])), w2[expert]) * share).to(x.dtype)
    return out


class StackedWeight(nn.Module):
    """One parameter `weight` holding every expert's copy of a projection, [E, out, in] (this rank's shard)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features), requires_grad=False)


class Experts(nn.Module):
    """Every expert's gate|up (`w13`) and down (`w2`) projections, sharded on the intermediate dim.

    Checkpoint tensors load per expert: `w13` takes shard_id (expert, 0) for gate rows and (expert, 1) for
    up rows, `w2` takes shard_id expert; each rank reads only its rows / columns of each."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        assert intermediate_size % self.tp_size == 0, \
            f"expert intermediate size {intermediate_size} does not split over {self.tp_size} ranks"
        self.num_experts = num_experts
        self.local_size = intermediate_size // self.tp_size
        self.w13 = StackedWeight(num_experts, 2 * self.local_size, hidden_size)
        self.w2 = StackedWeight(num_experts, hidden_size, self.local_size)
        self.w13.weight.weight_loader = self._load_w13
        self.w2.weight.weight_loader = self._load_w2
        self.act = gated_activation(hidden_act)

    def _load_w13(self, param: nn.Parameter, loaded, shard_id) -> None:
        expert, half = shard_id
        start = self.tp_rank * self.local_size
        target = param.data[expert].narrow(0, half * self.local_size, self.local_size)
        _copy(target, loaded[start:start + self.local_size])

    def _load_w2(self, param: nn.Parameter, loaded, shard_id) -> None:
        start = self.tp_rank * self.local_size
        _copy(param.data[shard_id], loaded[:, start:start + self.local_size])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum; the caller all-reduces."""
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        experts = masked_experts if capturing else grouped_experts
        return experts(x, self.w13.weight, self.w2.weight, weights, expert_ids, self.act)


def _copy(target: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(f"expert weight shape {tuple(loaded.shape)} does not fit {tuple(target.shape)}")
    target.copy_(loaded)


class Router(nn.Module):
    """The replicated gate [E, H]. Not a LinearBase, so --quantize leaves it (and routing) in the model dtype."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated) + `experts`; the checkpoint's own module name is the caller's choice."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, routing: Routing,
                 hidden_act: str = "silu") -> None:
        super().__init__()
        self.routing = routing
        self.gate = Router(hidden_size, num_experts)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = route(self.gate(x), self.routing)
        out = self.experts(x, weights, expert_ids)
        return all_reduce(out) if self.experts.tp_size > 1 else out


def expert_checkpoint_mapping(num_experts: int, names: tuple[str, str, str]) -> dict:
    """packed_modules_mapping entries for per-expert checkpoint tensors: `experts.N.<gate|up|down>` ->
    the stacked parameters. `names`: the checkpoint's (gate, up, down) names (Mixtral: w1, w3, w2)."""
    gate, up, down = names
    mapping = {}
    for e in range(num_experts):
        mapping[f"experts.{e}.{gate}"] = ("experts.w13", (e, 0))
        mapping[f"experts.{e}.{up}"] = ("experts.w13", (e, 1))
        mapping[f"experts.{e}.{down}"] = ("experts.w2", e)
    return mapping
