"""A decode step of a Llama-family layer stack in one native call (kernels/llama_decode_cpu.cpp), on CPU.

Op by op, one token of SmolLM2 is ~2,000 ATen calls and ~150 OpenMP regions from Python; for a single stream that
overhead outweighs the matmuls. The fused step runs the same arithmetic (the same inner loops, bit for bit) with one
OpenMP team for the whole step. It serves a step when:

- the model is the Llama family's (LlamaAttention + LlamaMLP in PreNormDecoderLayers) on one rank, without LoRA;
- every linear holds grouped 4/8-bit weights served by our kernel (GGUF, GPTQ, AWQ, --quantize int4*), no bias;
- activations, K/V pool and norms are float32, rotary is plain (no LongRoPE, full head), no sliding window;
- the step is decode only, of at most FUSED_MAX_ROWS sequences, through the native paged-attention kernel.

With --activation-quantization int8, steps of up to the linears' shared timed int8 row limit (int8_max_rows of
grouped_linear) round activations to int8, larger ones run the float kernels, as the op-by-op path does.

Anything else, and GENSERVE_FUSED_DECODE=0, runs the op-by-op path.

Where the embedding and the LM head hold grouped weights too (GGUF, --quantize int8), decode steps whose rows all
pick greedily run `greedy_steps` instead: embedding, layers, LM head and greedy pick in one call, for one step or
for several back to back (--num-scheduler-steps), with the same results as the steps one by one.
"""

from __future__ import annotations

import logging
import os

import torch

from genserve.server import kernels
from genserve.server.layers.attention import get_forward_context
from genserve.server.layers.grouped_linear import GROUPED_MAX_ROWS, GroupedWeights
from genserve.server.layers.norm import RMSNorm

logger = logging.getLogger(__name__)

# beyond this many rows the op-by-op path dequantizes and runs the dense GEMM
FUSED_MAX_ROWS = GROUPED_MAX_ROWS


class FusedLlamaDecode:
    """The operands of every layer, gathered once; called per step by PreNormModel.forward."""

    def __init__(self, norms, linears, attention_layers, rotary, embedding=None, head=None) -> None:
        self.norm_weights = [n.weight for n in norms]
        self.eps = norms[0].eps
        self.qweights = [m.weight for m in linears]
        self.scales = [m.weight_scale for m in linears]
        self.mins = [m.weight_min for m in linears]
        self.group_sizes = [m.quant_method.group_size for m in linears]
        self.attention_layers = attention_layers
        self._gather_caches()
        self.cos_sin = rotary.cos_sin_cache
        first = attention_layers[0]
        self.num_heads, self.num_kv_heads, self.scale = first.num_heads, first.num_kv_heads, first.scale
        # steps of up to this many rows round activations to int8 (0: never): the linears' shared limit, the head's own
        self.int8_max_rows = min(m.quant_method.int8_max_rows for m in linears)
        # (qweight, scale, min, group size) of a grouped embedding and LM head; None: greedy_steps cannot run
        self.embedding = _grouped_operands(embedding)
        self.head = _grouped_operands(head)
        grouped_head = getattr(head, "grouped", None)
        self.head_int8_max_rows = grouped_head.int8_max_rows if grouped_head else 0

    @property
    def runs_greedy_steps(self) -> bool:
        return self.embedding is not None and self.head is not None

    def _gather_caches(self) -> None:
        self.k_caches = [layer.k_cache for layer in self.attention_layers]
        self.v_caches = [layer.v_cache for layer in self.attention_layers]

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The final norm's output [T, H] for a decode-only step; None for any other step."""
        meta = get_forward_context()
        rows = hidden.shape[0]
        if (meta.num_decode_tokens != rows or rows > FUSED_MAX_ROWS or meta.decode_block_tables is None
                or (meta.decode_backend or "kernel") != "kernel" or hidden.dtype != torch.float32):
            return None
        if self.attention_layers[0].k_cache is not self.k_caches[0]:  # the pool was allocated again
            self._gather_caches()
        return kernels.llama_decode(hidden.contiguous(), positions, self.norm_weights, self.qweights, self.scales,
                                    self.mins, self.group_sizes, self.k_caches, self.v_caches, self.cos_sin,
                                    meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens,
                                    meta.block_size, self.num_heads, self.num_kv_heads, self.scale, self.eps,
                                    rows <= self.int8_max_rows)


    def greedy_steps(self, token_ids: torch.Tensor, positions: torch.Tensor, steps: int, slot_mapping: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> torch.Tensor:
        """`steps` greedy tokens per row from one call -> [B * steps, 2] float64 (id, logprob), row-major; the caller
        checks the rows (decode only, greedy with nothing to mask, at most FUSED_MAX_ROWS)."""
        if self.attention_layers[0].k_cache is not self.k_caches[0]:
            self._gather_caches()
        rows = token_ids.shape[0]
        return kernels.llama_decode_greedy(token_ids, positions, steps, self.embedding, self.head,
                                           rows <= self.head_int8_max_rows, self.norm_weights,
                                           self.qweights, self.scales, self.mins, self.group_sizes, self.k_caches,
                                           self.v_caches, self.cos_sin, slot_mapping, block_tables, context_lens,
                                           block_size, self.num_heads, self.num_kv_heads, self.scale, self.eps,
                                           rows <= self.int8_max_rows)


def _grouped_operands(layer) -> tuple | None:
    """A grouped embedding / LM head on our kernel's layout (N % 4 == 0), as llama_decode_greedy takes it."""
    grouped = getattr(layer, "grouped", None)
    if (grouped is None or grouped.torch_int4 is not None or grouped.input_order is not None
            or layer.weight.shape[0] % 4 or layer.weight.device.type != "cpu" or layer.float_dtype != torch.float32):
        return None
    return layer.weight, layer.weight_scale, layer.weight_min, grouped.group_size


def build(model, tp_size: int, lora_enabled: bool) -> tuple[FusedLlamaDecode | None, str]:
    """The fused decode for `model` (a CausalLM), or None and why not."""
    from genserve.server.models.common import PreNormDecoderLayer, PreNormModel
    from genserve.server.models.llama import LlamaAttention, LlamaMLP

    if os.environ.get("GENSERVE_FUSED_DECODE", "1") == "0":
        return None, "off (GENSERVE_FUSED_DECODE=0)"
    body = getattr(model, "body", None)
    if type(body) is not PreNormModel:
        return None, "not a Llama-family layer stack"
    if tp_size > 1 or lora_enabled:
        return None, "tensor parallel" if tp_size > 1 else "LoRA adapters"
    norms, linears, attention_layers, rotaries = [], [], [], set()
    for layer in body.layers:
        if (type(layer) is not PreNormDecoderLayer or type(layer.self_attn) is not LlamaAttention
                or type(layer.mlp) is not LlamaMLP):
            return None, "a layer that is not Llama's"
        attn = layer.self_attn
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        linears += [attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
        attention_layers.append(attn.attn)
        rotaries.add(attn.rotary_emb)
    norms.append(body.norm)
    for norm in norms:
        if type(norm) is not RMSNorm or norm.weight.dtype != torch.float32 or norm.eps != norms[0].eps:
            return None, "norms that are not float32 RMSNorms of one eps"
    for linear in linears:
        method = linear.quant_method
        if (not isinstance(method, GroupedWeights) or method.torch_int4 is not None or method.input_order is not None
                or linear.bias is not None or linear.lora is not None or linear.weight.device.type != "cpu"):
            return None, "linears that are not grouped 4/8-bit weights on our kernel (float, torch int4pack, " \
                         "act-order or bias)"
    if len({linear.quant_method.int8_activations for linear in linears}) != 1:
        return None, "int8 activations on some linears only"
    rotary = rotaries.pop() if len(rotaries) == 1 else None
    first = attention_layers[0]
    if (rotary is None or rotary.long_rows or rotary.rotary_dim != first.head_dim
            or rotary.cos_sin_cache.dtype != torch.float32 or first.head_dim not in kernels.SUPPORTED_HEAD_DIMS):
        return None, "rotary embedding other than plain full-head float32"
    if any(a.sliding_window is not None or a.has_score_mods for a in attention_layers):
        return None, "sliding windows or score changes"
    if first.k_cache.dtype != torch.float32:
        return None, "a K/V pool that is not float32"
    if not kernels.load_cpu_kernels():
        return None, "native CPU kernels unavailable"
    fused = FusedLlamaDecode(norms, linears, attention_layers, rotary, body.embed_tokens,
                             model.head if model.final_logit_softcap is None else None)
    return fused, "on" + (", greedy steps with the LM head" if fused.runs_greedy_steps else "")
