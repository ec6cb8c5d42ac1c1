"""Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) over a flat ragged batch of tokens, tensor-parallel ready."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from genserve.server.distributed import get_tp_size
from genserve.server.layers.activation import SiluAndMul
from genserve.server.layers.attention import Attention
from genserve.server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from genserve.server.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
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


class LlamaAttention(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, sliding_window: int | None = None) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        attention_bias = getattr(config, "attention_bias", False)
        is_qwen2 = config.model_type == "qwen2"  # Qwen2 always has q/k/v bias and never an o_proj bias
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=attention_bias or is_qwen2)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        bias=attention_bias and not is_qwen2)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5,
                              sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        self.rotary_emb(positions, qkv[:, :self.q_size + self.kv_size])
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        assert config.hidden_act == "silu", f"hidden_act {config.hidden_act!r} is not supported"
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, layer_sliding_window(config, layer_idx))
        self.mlp = LlamaMLP(config)
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
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # one cos/sin cache shared by every layer
        rotary_emb = RotaryEmbedding(config, head_dim_of(config))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary_emb, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype or config_dtype(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.tp_size = get_tp_size()
        with default_dtype(self.dtype):
            self.model = LlamaModel(config)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] for all sequences' new tokens, flat -> hidden [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] rows that need a next token -> logits [N, vocab] in the model dtype."""
        return self.lm_head(hidden)
