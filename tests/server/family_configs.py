"""Tiny random checkpoints of every natively served family, built from each family's own transformers config;
sliding windows are shorter than the test prompts."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

WINDOW = 8  # test prompts run to 40 tokens

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                   patch_size=14)


def _longrope(rotary_dim: int) -> dict:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 0.3 * i for i in range(half)]}


def family_configs() -> dict[str, tuple[str, dict]]:
    """name -> (transformers config class, overrides of TINY)."""
    gemma = dict(head_dim=16, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                 sliding_window=WINDOW)
    return {
        "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False)),
        "qwen3-tied-window-bias": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True, attention_bias=True,
                                                       use_sliding_window=True, sliding_window=WINDOW,
                                                       max_window_layers=1)),
        "gemma2": ("Gemma2Config", dict(gemma, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=5.0)),
        "gemma3": ("Gemma3TextConfig", dict(
            gemma, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=None, final_logit_softcapping=None,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
        # gemma-3-4b/12b/27b-it: the same text model inside Gemma3ForConditionalGeneration (save_family nests it)
        "gemma3-multimodal": ("Gemma3Config", dict(
            gemma, num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 300.0}})),
        "phi3-longrope": ("Phi3Config", dict(rope_parameters=_longrope(16), sliding_window=WINDOW,
                                             original_max_position_embeddings=64, tie_word_embeddings=False)),
        "phi4-mini-partial": ("Phi3Config", dict(rope_parameters={**_longrope(8), "partial_rotary_factor": 0.5},
                                                 original_max_position_embeddings=64, tie_word_embeddings=True,
                                                 num_key_value_heads=1)),
        "gpt2": ("GPT2Config", dict(n_positions=128, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new")),
        "gpt2-scaled-by-layer": ("GPT2Config", dict(n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                                                    scale_attn_by_inverse_layer_idx=True, activation_function="gelu")),
        "gpt-neox-parallel-residual": ("GPTNeoXConfig", dict(intermediate_size=128, rotary_pct=0.25,
                                                             use_parallel_residual=True)),
        "gpt-neox-sequential": ("GPTNeoXConfig", dict(intermediate_size=128, rotary_pct=0.5, rotary_emb_base=500.0,
                                                      use_parallel_residual=False)),
        "bloom": ("BloomConfig", dict(n_layer=2, n_head=4)),
        "bloom-6-heads": ("BloomConfig", dict(hidden_size=96, n_layer=2, n_head=6,
                                              apply_residual_connection_post_layernorm=True)),
    }


def randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """HF zero-inits biases and ones-inits norms; random ones are tested too."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                param.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)


def save_family(path: Path, name: str, **extra) -> torch.nn.Module:
    """A random tiny model of family `name` saved to `path` (safetensors); returns it (float32, eval)."""
    config_name, overrides = family_configs()[name]
    fields = {**TINY, **overrides, **extra}
    if config_name == "Gemma3Config":  # a multimodal checkpoint: the text config inside, a tiny vision tower beside
        config = transformers.Gemma3Config(text_config=fields, vision_config=TINY_VISION, mm_tokens_per_image=4)
    else:
        config = getattr(transformers, config_name)(**fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_norms_and_biases(model)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    return model
