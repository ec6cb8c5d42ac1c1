"""Grouped 4/8-bit weights times bfloat16 activations on AMX tiles (kernels/grouped_amx_cpu.cpp), and the choice of
it at startup (grouped_linear.choose_amx). Skipped where the CPU (or the kernel build) has no AMX-BF16."""

from __future__ import annotations

import pytest
import torch
from model_helpers import torch_threads
from quant_reference import engine_greedy, tokenize
from test_gguf_quantized import first_divergence
from test_int4_kernel import random_grouped

from genserve.server import kernels
from genserve.server.layers.grouped_linear import AMX_TIMED_ROWS, choose_amx, grouped_methods
from genserve.server.model_files import resolve_model

pytestmark = pytest.mark.skipif(not (kernels.load_cpu_kernels() and kernels.has_amx_bf16()),
                                reason="no AMX-BF16 on this CPU")


def bf16_weight(qweight, scale, mins, group_size) -> torch.Tensor:
    """The weight as the kernel multiplies it: dequantized in float32, rounded once to bfloat16."""
    return kernels.grouped_dequantize(qweight, scale, mins, group_size).to(torch.bfloat16)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("n,k,group_size", [(64, 256, 32), (48, 576, 128), (1536, 576, 32), (32, 1536, 64),
                                           (32, 288, 32)],
                         ids=["small", "ragged-last-group-and-16-row-panel", "smollm2-mlp", "g64", "odd-group-count"])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 64])
def test_amx_kernel_sums_the_bf16_weights_products(bits, scale_dtype, n, k, group_size, rows):
    torch.manual_seed(rows * 7 + n)
    qweight, scale, mins = random_grouped(n, k, group_size, bits, scale_dtype)
    x = torch.randn(rows, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16) if rows % 2 else None
    with torch_threads(2):
        y = kernels.int4_linear_amx(x, qweight, scale, mins, group_size, bias)
    expected = x.double() @ bf16_weight(qweight, scale, mins, group_size).double().T
    if bias is not None:
        expected += bias.double()
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # each output rounded once to bf16 (half a unit: at most 2^-8 relative) from a float32 sum of exact products
    error = (y.double() - expected).abs()
    assert (error <= 2**-8 * expected.abs() + 1e-4 * expected.abs().max()).all(), error.max()


@pytest.mark.parametrize("bits", [4, 8])
def test_amx_kernel_rounds_each_weight_once_to_bf16(bits):
    # a one-hot row picks one weight times 1: the output is exactly the bf16 weight the tiles multiplied
    torch.manual_seed(bits)
    qweight, scale, mins = random_grouped(96, 256, 32, bits, torch.float16)
    x = torch.eye(256, dtype=torch.bfloat16)[:40]
    y = kernels.int4_linear_amx(x, qweight, scale, mins, 32, None)
    assert torch.equal(y, bf16_weight(qweight, scale, mins, 32)[:, :40].T.contiguous())


def test_amx_kernel_refuses_what_it_cannot_run():
    qweight, scale, mins = random_grouped(40, 256, 32, 4, torch.float16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.int4_linear_amx(torch.randn(2, 256).to(torch.bfloat16), qweight, scale, mins, 32, None)
    qweight, scale, mins = random_grouped(48, 256, 32, 4, torch.float16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.int4_linear_amx(torch.randn(2, 256), qweight, scale, mins, 32, None)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        kernels.int4_linear_amx(torch.randn(2, 240).to(torch.bfloat16), qweight[:, :120], scale, mins, 32, None)
    assert kernels.int4_linear_amx(torch.empty(0, 256, dtype=torch.bfloat16), qweight, scale, mins, 32,
                                   None).shape == (0, 48)


@pytest.fixture(scope="module")
def quantized_dir(gguf_file):
    return resolve_model(str(gguf_file))


def test_bf16_serving_of_the_q4_1_file_runs_on_amx_and_agrees_with_the_bf16_model(quantized_dir, smollm2_dir,
                                                                                  monkeypatch):
    # bf16 products summed in float32 in another order than oneDNN's: close to the bf16 float model, not equal.
    # The row count is fixed: timed, a busy machine could leave a shape off the tiles
    monkeypatch.setenv("GENSERVE_AMX_MIN_ROWS", "2")
    prompts = tokenize(smollm2_dir)
    with torch.no_grad():
        engine, amx = engine_greedy(quantized_dir, prompts, dtype="bfloat16")
        _, dense = engine_greedy(smollm2_dir, prompts, dtype="bfloat16")
    methods = grouped_methods(engine.runner.model)
    assert methods and all(m.amx_min_rows == 2 for m in methods if m.torch_int4 is None)
    assert engine.runner.model.lm_head.grouped.amx_min_rows == 2  # the LM head (Q8_0, 49152 rows) too
    # (over 16 prompts x 32 tokens here, 77 % of the tokens came before the first divergence: as far from the dense
    # bf16 model as that is from float32, 84 %; a first token can differ, so only the total is checked)
    divergence = [first_divergence(a, b) for a, b in zip(amx, dense, strict=True)]
    assert sum(divergence) >= len(prompts) * len(amx[0]) // 2, divergence


def test_genserve_amx_0_keeps_the_float_kernels(quantized_dir, smollm2_dir, monkeypatch):
    monkeypatch.setenv("GENSERVE_AMX", "0")
    with torch.no_grad():
        engine, _ = engine_greedy(quantized_dir, tokenize(smollm2_dir)[:1], new_tokens=2, dtype="bfloat16")
    assert all(m.amx_min_rows is None for m in grouped_methods(engine.runner.model))


def test_the_timed_choice_picks_a_timed_row_count_or_none(quantized_dir, smollm2_dir):
    with torch.no_grad():
        engine, _ = engine_greedy(quantized_dir, tokenize(smollm2_dir)[:1], new_tokens=1, dtype="bfloat16")
    choices = choose_amx(engine.runner.model, torch.bfloat16)
    assert choices and set(choices.values()) <= {*AMX_TIMED_ROWS, None}
