"""GGUF served quantized: Q4_0 / Q4_1 / Q8_0 blocks become grouped weights without dequantizing, Llama's Q/K
rows un-permuted; SmolLM2's Q4_1 file gives the greedy tokens of a float model holding its dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quant_reference import engine_greedy, float_checkpoint, hf_greedy, tokenize
from safetensors.torch import load_file

from genserve.server.gguf_weights import blocks_to_grouped, unpermute_rows
from genserve.server.layers.grouped_linear import INT8_TIMED_ROWS
from genserve.server.layers.grouped_weights import dequantize
from genserve.server.layers.linear import LinearBase
from genserve.server.model_files import resolve_model


@pytest.fixture(scope="module")
def quantized_dir(gguf_file):
    return resolve_model(str(gguf_file))


def dequantized_tensors(model_dir) -> dict[str, torch.Tensor]:
    tensors = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(("_scale", "_min")):
            continue
        out[name] = dequantize(tensor, tensors[name + "_scale"], tensors[name + "_min"], 32) \
            if name + "_scale" in tensors else tensor
    return out


def test_blocks_match_ggufs_own_dequantization():
    import gguf

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 128)).astype(np.float32)
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        qtype = gguf.GGMLQuantizationType[kind]
        blocks = gguf.quants.quantize(weights, qtype)
        qweight, scale, mins = blocks_to_grouped(kind, blocks)
        assert qweight.dtype == (torch.int8 if kind == "Q8_0" else torch.uint8)
        expected = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
        assert torch.equal(dequantize(qweight, scale, mins, 32), expected), kind


def test_unpermute_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.arange(192 * 3, dtype=np.float32).reshape(192, 3)
    expected = LlamaTensorProcessor()._reverse_permute_weights(rows, 9, 3)
    assert np.array_equal(rows[unpermute_rows(192, 3).numpy()], expected)


def test_smollm2_q4_1_dequantizes_exactly_as_transformers_does(quantized_dir, smollm2_dir):
    # the default model folder is transformers' dequantization of this same GGUF file
    tensors = load_file(str(quantized_dir / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float16
    reference = load_file(str(smollm2_dir / "model.safetensors"))
    ours = dequantized_tensors(quantized_dir)
    assert ours.keys() == reference.keys()
    for name, weight in reference.items():
        assert torch.equal(ours[name], weight), name


def test_smollm2_q4_1_greedy_equals_the_dequantized_float_model(quantized_dir, smollm2_dir, tmp_path):
    prompts = tokenize(smollm2_dir)
    with torch.no_grad():
        engine, quantized = engine_greedy(quantized_dir, prompts)
    model = engine.runner.model
    assert model.checkpoint_quantization == "gguf"
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.weight.dtype == torch.uint8 for m in linears)  # all Q4_1: nothing dequantized
    stored = sum(p.untyped_storage().nbytes() for m in linears for p in (m.weight, m.weight_scale, m.weight_min))
    bf16 = sum(m.input_size * m.output_size * 2 for m in linears)
    assert stored / bf16 <= 5 / 16 + 1e-6  # Q4_1: 4 bits + fp16 scale and min per 32 weights
    embedding = model.model.embed_tokens
    assert embedding.weight.dtype == torch.int8 and embedding.grouped.group_size == 32  # token_embd is Q8_0
    assert model.lm_head.weight is embedding.weight and model.lm_head.grouped is not None  # tied: one copy
    del engine, model
    reference_dir = float_checkpoint(smollm2_dir, tmp_path / "dequantized", weights=dequantized_tensors(quantized_dir))
    assert quantized == hf_greedy(reference_dir, prompts)


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def test_int8_activations_serve_the_q4_1_file_close_to_float_activations(quantized_dir, smollm2_dir):
    # llama.cpp's arithmetic (activations rounded to int8 per block of 32): not token-exact by design, so the
    # check is agreement with the float-activation run, which the test above ties to transformers
    prompts = tokenize(smollm2_dir)
    with torch.no_grad():
        _, exact = engine_greedy(quantized_dir, prompts)
        engine, rounded = engine_greedy(quantized_dir, prompts, activation_quantization="int8")
    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert all(m.quant_method.int8_activations for m in linears) and model.lm_head.grouped.int8_activations
    # up to a row count timed per weight shape at startup: at least one row, at most the largest timed
    limits = {m.quant_method.int8_max_rows for m in linears} | {model.lm_head.grouped.int8_max_rows}
    assert limits <= set(INT8_TIMED_ROWS), limits
    divergence = [first_divergence(a, b) for a, b in zip(exact, rounded, strict=True)]
    assert all(d >= 1 for d in divergence), divergence  # every prompt's first token agrees
    assert sum(divergence) >= len(prompts) * len(exact[0]) // 2, divergence


def test_int8_activations_need_grouped_weights(smollm2_dir):
    with pytest.raises(ValueError, match="needs 4-bit or 8-bit grouped weights"):
        engine_greedy(smollm2_dir, [[1, 2, 3]], activation_quantization="int8")
    with pytest.raises(ValueError, match="must be none or int8"):
        engine_greedy(smollm2_dir, [[1, 2, 3]], activation_quantization="int4")
