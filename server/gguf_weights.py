"""A `.gguf` file as a quantized safetensors folder: Q4_0, Q4_1 and Q8_0 blocks of the linear layers are
copied as they are into grouped weights (layers/grouped_weights.py), never dequantized; so are the token
embedding and output (LM head) when they are of those types (SmolLM2's Q4_1 file: token_embd Q8_0, tied).

    Q4_1 block (20 bytes / 32 weights): d fp16, m fp16, 16 bytes of nibbles   w = q * d + m
    Q4_0 block (18 bytes):              d fp16, 16 bytes of nibbles           w = (q - 8) * d
    Q8_0 block (34 bytes):              d fp16, 32 int8                       w = q * d

GGUF's nibble order (byte j = value j | value j + 16 << 4) is our kernel's, so qweight is the blocks'
bytes. Other tensor types (K-quants, F16, ...) of a linear or the vocabulary are dequantized with a
warning; norms are float32. llama.cpp's converter permutes the rows of Llama's Q and
K weights for its rotary layout; they are put back here (a row permutation: exact on blocks too).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

GROUP_SIZE = 32
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}
OTHERS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
VOCABULARY = ("model.embed_tokens.weight", "lm_head.weight")  # kept quantized as the linears are
ARCHITECTURES = {"llama": "LlamaForCausalLM"}  # the GGUF tensor names mapped above are Llama's
# the cached folder's name carries this: a file converted by an older layout is converted again
FOLDER_VERSION = "quantized-v2"


def hf_name(gguf_name: str) -> tuple[str, bool]:
    """GGUF tensor name -> (transformers name, is a linear layer's weight)."""
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name], False
    _, layer, part, suffix = gguf_name.split(".", 3)
    if part in LINEARS:
        return f"model.layers.{layer}.{LINEARS[part]}.{suffix}", suffix == "weight"
    if part in OTHERS:
        return f"model.layers.{layer}.{OTHERS[part]}.{suffix}", False
    raise ValueError(f"GGUF tensor {gguf_name} has no place in a Llama model")


def blocks_to_grouped(kind: str, data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q8_0 rows [N, blocks * bytes] uint8 -> (qweight, scale fp16, min fp16) per 32 weights."""
    raw = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy: the reader maps the file read-only
    n = raw.shape[0]
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = raw.view(n, -1, size)
    scale = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, -1)
    if kind == "Q4_1":
        mins = blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, -1)
        qweight = blocks[..., 4:].reshape(n, -1)
    elif kind == "Q4_0":
        mins = scale * -8  # exact: a power of two
        qweight = blocks[..., 2:].reshape(n, -1)
    else:
        mins = torch.zeros_like(scale)
        qweight = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, -1)
    return qweight.contiguous(), scale.contiguous(), mins.contiguous()


def unpermute_rows(num_rows: int, num_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's Q/K permutation: hf[i] = gguf[perm[i]]."""
    dim = num_rows // num_heads // 2
    return torch.arange(num_rows).reshape(num_heads, dim, 2).transpose(1, 2).reshape(-1)


def read_tensors(gguf_file: Path, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor under its transformers name; a quantized linear X as X.weight / X.weight_scale / X.weight_min."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    tensors: dict[str, torch.Tensor] = {}
    dequantized = []
    for t in reader.tensors:
        name, is_linear = hf_name(t.name)
        kind = t.tensor_type.name
        perm = None
        if ".attn_q." in t.name or ".attn_k." in t.name:
            rows = int(t.shape[-1])
            perm = unpermute_rows(rows, num_heads if ".attn_q." in t.name else num_kv_heads)
        is_linear = is_linear or name in VOCABULARY
        if is_linear and kind in ("Q4_0", "Q4_1", "Q8_0"):
            parts = blocks_to_grouped(kind, t.data)
            if perm is not None:
                parts = tuple(p[perm].contiguous() for p in parts)
            tensors[name], tensors[name + "_scale"], tensors[name + "_min"] = parts
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        if kind in ("F32", "F16", "BF16"):
            values = torch.from_numpy(np.array(t.data)).float().reshape(shape)
        else:
            values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).float().reshape(shape)
            if is_linear:
                dequantized.append(f"{t.name} ({kind})")
        tensors[name] = values[perm].contiguous() if perm is not None else values
    if dequantized:
        logger.warning("GGUF types without a quantized kernel, dequantized to float32: %s", ", ".join(dequantized))
    return tensors


def convert_gguf_quantized(gguf_file: Path, target: Path) -> Path:
    """Write `target` (config, tokenizer, one safetensors file of grouped weights) from a Llama GGUF file.
    Other architectures go through the dequantizing conversion (model_files.convert_gguf) with a warning."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type not in ARCHITECTURES:
        from genserve.server.model_files import convert_gguf

        logger.warning("GGUF %s is a %s model: its weights are dequantized (quantized GGUF is read for %s)",
                       gguf_file, config.model_type, ", ".join(ARCHITECTURES))
        return convert_gguf(gguf_file, target)
    logger.info("reading %s into quantized safetensors in %s", gguf_file, target)
    tensors = read_tensors(gguf_file, config.num_attention_heads, config.num_key_value_heads)
    config.architectures = [ARCHITECTURES[config.model_type]]
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config.save_pretrained(partial)
    # quantization_config written by hand: transformers' config classes would try to validate "gguf"
    config_file = partial / "config.json"
    saved = json.loads(config_file.read_text())
    saved["quantization_config"] = {"quant_method": "gguf", "group_size": GROUP_SIZE, "source": str(gguf_file)}
    config_file.write_text(json.dumps(saved, indent=2))
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(partial)
    save_file(tensors, str(partial / "model.safetensors"))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
