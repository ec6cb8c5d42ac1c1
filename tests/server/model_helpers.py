"""Run a native model standalone: build AttentionMetadata by hand and attach a flat KV cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch import nn

from genserve.server.layers.attention import Attention, AttentionMetadata, forward_context


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """On a shared 2-core box a busy second OpenMP thread makes every op wait on it (10x slower steps)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


SMOLLM2_VOCAB = 49152  # SmolLM2's tokenizer, which the tiny test models share


def random_prompts(lengths, seed: int = 1, vocab: int = SMOLLM2_VOCAB) -> list[list[int]]:
    """Prompts of the given lengths, token ids drawn from [3, vocab) (clear of the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def attach_kv_cache(model: nn.Module, num_slots: int, dtype: torch.dtype | None = None) -> None:
    """Give every Attention module its own [num_slots, kv_heads, head_dim] K and V pools."""
    for module in model.modules():
        if isinstance(module, Attention):
            dt = dtype or next(model.parameters()).dtype
            module.k_cache = torch.zeros(num_slots, module.num_kv_heads, module.head_dim, dtype=dt)
            module.v_cache = torch.zeros(num_slots, module.num_kv_heads, module.head_dim, dtype=dt)


def build_metadata(decode_contexts: list[list[int]] = (),
                   prefill_contexts: list[tuple[list[int], int]] = ()) -> AttentionMetadata:
    """Decode sequences first, then prefill chunks, as the runner orders tokens.

    decode_contexts[i]: the slots of sequence i's whole context, its new token's slot last.
    prefill_contexts[i]: (slots of the whole context, number of new tokens at its end).
    """
    slots = [ctx[-1] for ctx in decode_contexts]
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(decode_contexts))
    if decode_contexts:
        max_len = max(len(ctx) for ctx in decode_contexts)
        index = torch.zeros(len(decode_contexts), max_len, dtype=torch.long)
        mask = torch.zeros((len(decode_contexts), 1, 1, max_len), dtype=torch.bool)
        for i, ctx in enumerate(decode_contexts):
            index[i, :len(ctx)] = torch.tensor(ctx)
            mask[i, ..., :len(ctx)] = True
        meta.decode_gather_index, meta.decode_mask = index, mask
    start = 0
    meta.prefill_starts.append(0)
    for ctx, num_new in prefill_contexts:
        slots.extend(ctx[len(ctx) - num_new:])
        start += num_new
        meta.prefill_starts.append(start)
        meta.prefill_context_lens.append(len(ctx))
        meta.prefill_gather_index.append(None if num_new == len(ctx) else torch.tensor(ctx))
    meta.slot_mapping = torch.tensor(slots, dtype=torch.long)
    return meta


def run_model(model: nn.Module, input_ids: list[int], positions: list[int], meta: AttentionMetadata,
              logit_rows: list[int] | None = None) -> torch.Tensor:
    """One forward pass -> float32 logits [N, vocab] for `logit_rows` (all tokens when None)."""
    with torch.inference_mode(), forward_context(meta):
        hidden = model(torch.tensor(input_ids), torch.tensor(positions))
        if logit_rows is not None:
            hidden = hidden[logit_rows]
        return model.compute_logits(hidden).float()


def load_native(model_dir: str | Path, dtype: torch.dtype = torch.float32, num_slots: int = 256) -> nn.Module:
    from transformers import AutoConfig

    from genserve.server.loader import load_weights
    from genserve.server.models import get_model_class

    config = AutoConfig.from_pretrained(model_dir)
    model = get_model_class(config.architectures)(config, dtype=dtype)
    load_weights(model, model_dir)
    attach_kv_cache(model, num_slots)
    return model.eval()


TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CONFIGS = {
    "llama-gqa": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama-tied-bias": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-linear-rope": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                               "factor": 2.0})),
    "llama-yarn-rope": ("LlamaConfig", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                             "factor": 4.0,
                                                             "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "mistral-head-dim": ("MistralConfig", dict(head_dim=32, sliding_window=None)),
    "llama-mha": ("LlamaConfig", dict(num_key_value_heads=4)),
}


def make_tiny_checkpoint(path, config_name: str, overrides: dict):
    """Save a random tiny HF model to `path`; returns the HF model (float32, eval)."""
    config = getattr(transformers, config_name)(**{**TINY, **overrides})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms; randomize so they are tested
        for name, param in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    hf.config.architectures = [type(hf).__name__]
    hf.save_pretrained(path)
    return hf


def save_tiny_llama(path, tokenizer_dir, num_kv_heads: int) -> Path:
    """A random 2-layer Llama (4 query heads) with SmolLM2's tokenizer, for engine-level tests.

    initializer_range is large so greedy choices are not near-ties that float rounding could flip.
    """
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, max_position_embeddings=512, initializer_range=0.3,
        tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return Path(path)
