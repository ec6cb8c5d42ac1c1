"""Grouped 4/8-bit weights times bfloat16 activations in hardware: AMX tiles (kernels/grouped_amx_cpu.cpp) and
AVX512-BF16 dot products (kernels/grouped_dpbf16_cpu.cpp), and the choice between them and the float kernel at startup
(grouped_linear.choose_bf16_kernels). Each kernel's tests skip where the CPU (or the kernel build) cannot run it."""

from __future__ import annotations

import pytest
import torch
from model_helpers import torch_threads
from quant_reference import engine_greedy, tokenize
from test_gguf_quantized import first_divergence
from test_int4_kernel import random_grouped

from genserve.server import kernels
from genserve.server.layers.grouped_linear import (
    BF16_KERNELS,
    BF16_TIMED_ROWS,
    bf16_kernels,
    choose_bf16_kernels,
    grouped_methods,
)
from genserve.server.model_files import resolve_model
from genserve.server.sampling_params import SamplingParams

USABLE = bf16_kernels(torch.bfloat16) if kernels.load_cpu_kernels() else []
pytestmark = pytest.mark.skipif(not USABLE, reason="no AMX-BF16 or AVX512-BF16 on this CPU")


def usable(name):
    return pytest.param(name, marks=pytest.mark.skipif(name not in USABLE, reason=f"{name} does not run here"))


KERNEL_NAMES = [usable("amx"), usable("dpbf16")]


def bf16_weight(qweight, scale, mins, group_size) -> torch.Tensor:
    """The weight as the AMX kernel multiplies it: dequantized in float32, rounded once to bfloat16."""
    return kernels.grouped_dequantize(qweight, scale, mins, group_size).to(torch.bfloat16)


def kernel_weight(name, qweight, scale, mins, group_size) -> torch.Tensor:
    """The weight each kernel multiplies: AMX tiles hold it rounded to bf16; the AVX512-BF16 kernel multiplies the
    integers q and scales each group's sum after, so its weight is the exact q * scale + min."""
    if name == "amx":
        return bf16_weight(qweight, scale, mins, group_size).double()
    return kernels.grouped_dequantize(qweight, scale, mins, group_size).double()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("n,k,group_size", [(64, 256, 32), (48, 576, 128), (1536, 576, 32), (32, 1536, 64),
                                           (32, 288, 32)],
                         ids=["small", "ragged-last-group-and-16-row-panel", "smollm2-mlp", "g64", "odd-group-count"])
@pytest.mark.parametrize("rows", [1, 3, 15, 16, 17, 33, 64])
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_bf16_kernel_sums_the_products_of_the_weights_it_multiplies(name, bits, scale_dtype, n, k, group_size, rows):
    torch.manual_seed(rows * 7 + n)
    qweight, scale, mins = random_grouped(n, k, group_size, bits, scale_dtype)
    x = torch.randn(rows, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16) if rows % 2 else None
    with torch_threads(2):
        y = BF16_KERNELS[name](x, qweight, scale, mins, group_size, bias)
    expected = x.double() @ kernel_weight(name, qweight, scale, mins, group_size).T
    if bias is not None:
        expected += bias.double()
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # each output rounded once to bf16 (half a unit: at most 2^-8 relative) from a float32 sum of exact products
    error = (y.double() - expected).abs()
    assert (error <= 2**-8 * expected.abs() + 1e-4 * expected.abs().max()).all(), error.max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_a_one_hot_row_gives_the_weight_the_kernel_multiplies(name, bits, scale_dtype):
    torch.manual_seed(bits)
    qweight, scale, mins = random_grouped(96, 256, 32, bits, scale_dtype)
    x = torch.eye(256, dtype=torch.bfloat16)[:40]
    y = BF16_KERNELS[name](x, qweight, scale, mins, 32, None)
    if name == "amx":  # the tiles multiply the weight rounded to bf16: exactly that comes out
        assert torch.equal(y, bf16_weight(qweight, scale, mins, 32)[:, :40].T.contiguous())
        return
    # the exact weight rounded once to bf16 (2^-8 relative at most), give or take float32 roundings of the scaled
    # group sum: scale * (q + 128) + (min - 128 * scale) for 4-bit weights, a few units of 2^-24 * 128 * scale
    exact = kernels.grouped_dequantize(qweight, scale, mins, 32)[:, :40].T.double()
    row_scale = (scale.double().abs().amax(1) + mins.double().abs().amax(1))[None, :]
    assert ((y.double() - exact).abs() <= 2**-8 * exact.abs() + 2**-14 * row_scale).all()


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_bf16_kernel_refuses_what_it_cannot_run(name):
    kernel = BF16_KERNELS[name]
    if name == "amx":  # tiles of 16 output rows
        qweight, scale, mins = random_grouped(40, 256, 32, 4, torch.float16)
        with pytest.raises(RuntimeError, match="multiple of 16"):
            kernel(torch.randn(2, 256).to(torch.bfloat16), qweight, scale, mins, 32, None)
    qweight, scale, mins = random_grouped(48, 256, 32, 4, torch.float16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel(torch.randn(2, 256), qweight, scale, mins, 32, None)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        kernel(torch.randn(2, 240).to(torch.bfloat16), qweight[:, :120], scale, mins, 32, None)
    assert kernel(torch.empty(0, 256, dtype=torch.bfloat16), qweight, scale, mins, 32, None).shape == (0, 48)


@pytest.fixture(scope="module")
def quantized_dir(gguf_file):
    return resolve_model(str(gguf_file))


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_bf16_serving_of_the_q4_1_file_runs_the_bf16_kernel_and_agrees_with_the_bf16_model(name, quantized_dir,
                                                                                           smollm2_dir, monkeypatch):
    # bf16 products summed in float32 in another order than oneDNN's: close to the bf16 float model, not equal.
    # The kernel and row count are fixed: timed, a busy machine could leave a shape on the float kernel
    monkeypatch.setenv("GENSERVE_BF16_KERNEL", name)
    monkeypatch.setenv("GENSERVE_BF16_MIN_ROWS", "2")
    prompts = tokenize(smollm2_dir)
    with torch.no_grad():
        engine, ours = engine_greedy(quantized_dir, prompts, dtype="bfloat16")
        _, dense = engine_greedy(smollm2_dir, prompts, dtype="bfloat16")
    methods = grouped_methods(engine.runner.model)
    assert methods and all((m.bf16_kernel, m.bf16_min_rows) == (name, 2) for m in methods if m.torch_int4 is None)
    head = engine.runner.model.lm_head.grouped  # the LM head (Q8_0, 49152 rows) too
    assert (head.bf16_kernel, head.bf16_min_rows) == (name, 2)
    # (over 16 prompts x 32 tokens here, 77 % of the tokens came before the first divergence: as far from the dense
    # bf16 model as that is from float32, 84 %; a first token can differ, so only the total is checked)
    divergence = [first_divergence(a, b) for a, b in zip(ours, dense, strict=True)]
    assert sum(divergence) >= len(prompts) * len(ours[0]) // 2, divergence


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_int8_activations_under_bf16_are_timed_against_the_bf16_kernel_and_take_the_batches_up_to_their_limit(
        name, quantized_dir, smollm2_dir, monkeypatch):
    """--dtype bfloat16 --activation-quantization int8: the int8 limit is timed against the kernel those rows would
    run otherwise (the bf16 one from its row count on), and each batch runs the int8 kernel up to the limit, the
    bf16 kernel above it."""
    monkeypatch.setenv("GENSERVE_BF16_KERNEL", name)
    monkeypatch.setenv("GENSERVE_BF16_MIN_ROWS", "2")
    calls = {"int8": [], name: []}
    int8_kernel, bf16_kernel = kernels.int4_linear_int8_activations, BF16_KERNELS[name]

    def recording(kind, kernel):
        def run(x, weight, *rest):
            calls[kind].append((x.shape[0], weight.shape))
            return kernel(x, weight, *rest)
        return run

    monkeypatch.setattr(kernels, "int4_linear_int8_activations", recording("int8", int8_kernel))
    monkeypatch.setitem(BF16_KERNELS, name, recording(name, bf16_kernel))
    prompts = tokenize(smollm2_dir)
    with torch.no_grad():
        engine, rounded = engine_greedy(quantized_dir, prompts, new_tokens=8, dtype="bfloat16",
                                        activation_quantization="int8")
    methods = [m for m in grouped_methods(engine.runner.model) if m.torch_int4 is None]
    limits = {m.layer.weight.shape: m.int8_max_rows for m in methods}
    # timing: for 2 rows and more (while int8 won) the bf16 kernel was the baseline, on the weights timed
    timed = [rows for rows, shape in calls[name] if shape in limits]
    assert timed and min(timed) >= 2 and all(limit >= 1 for limit in limits.values()), (timed, limits)
    calls["int8"].clear(), calls[name].clear()
    with torch.no_grad():
        again = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert again == rounded
    assert calls["int8"] and all(rows <= limits[shape] for rows, shape in calls["int8"])
    assert all(rows > limits[shape] for rows, shape in calls[name])
    # a batch of 16 prompts decodes 16 rows: the int8 kernel takes them where the limit reaches 16
    assert any(rows == len(prompts) for rows, _ in calls["int8"] + calls[name])


def test_genserve_bf16_kernel_float_keeps_the_float_kernels(quantized_dir, smollm2_dir, monkeypatch):
    monkeypatch.setenv("GENSERVE_BF16_KERNEL", "float")
    with torch.no_grad():
        engine, _ = engine_greedy(quantized_dir, tokenize(smollm2_dir)[:1], new_tokens=2, dtype="bfloat16")
    assert all(m.bf16_min_rows is None and m.bf16_kernel is None for m in grouped_methods(engine.runner.model))


def test_the_timed_choice_picks_a_usable_kernel_and_a_timed_row_count_or_none(quantized_dir, smollm2_dir):
    with torch.no_grad():
        engine, _ = engine_greedy(quantized_dir, tokenize(smollm2_dir)[:1], new_tokens=1, dtype="bfloat16")
    choices = choose_bf16_kernels(engine.runner.model, torch.bfloat16)
    assert choices and all(v is None or v[0] in USABLE and v[1] in BF16_TIMED_ROWS for v in choices.values())
    for method in grouped_methods(engine.runner.model):
        if method.bf16_kernel is not None:  # what each shape got is what the table says
            key = ("bf16", *method.layer.weight.shape, method.bits, method.group_size, method.layer.weight_scale.dtype)
            assert choices[key] == (method.bf16_kernel, method.bf16_min_rows)


def test_an_unknown_genserve_bf16_kernel_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("GENSERVE_BF16_KERNEL", "tiles")
    with pytest.raises(ValueError, match="GENSERVE_BF16_KERNEL='tiles': one of amx, dpbf16 or float"):
        bf16_kernels(torch.bfloat16)
