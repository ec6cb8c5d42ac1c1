"""The grouped int4 / int8 CPU kernel (kernels/int4_linear_cpu.cpp) and its packing, against a float64
reference over the dequantized weights."""

from __future__ import annotations

import pytest
import torch
from model_helpers import torch_threads

from genserve.server import kernels
from genserve.server.layers.grouped_weights import dequantize, pack_nibbles, quantize_int4, unpack_nibbles

pytestmark = pytest.mark.skipif(not kernels.load_cpu_kernels(), reason="native CPU kernels unavailable")


def random_grouped(n: int, k: int, group_size: int, bits: int, scale_dtype: torch.dtype):
    num_groups = -(-k // group_size)
    scale = (torch.rand(n, num_groups) * 0.1 + 0.01).to(scale_dtype)
    mins = (torch.randn(n, num_groups) * 0.3).to(scale_dtype)
    if bits == 4:
        qweight = pack_nibbles(torch.randint(0, 16, (n, k)))
    else:
        qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    return qweight, scale, mins


def reference(x, qweight, scale, mins, group_size, bias):
    w = dequantize(qweight, scale, mins, group_size, torch.float64)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("n,k,group_size", [(64, 256, 32), (36, 576, 128), (1536, 576, 32), (8, 1536, 64)],
                         ids=["small", "ragged-last-group", "smollm2-mlp", "g64"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8])
def test_kernel_matches_float64_reference(bits, scale_dtype, n, k, group_size, rows):
    torch.manual_seed(rows + n)
    qweight, scale, mins = random_grouped(n, k, group_size, bits, scale_dtype)
    x = torch.randn(rows, k)
    bias = torch.randn(n) if rows % 2 else None
    with torch_threads(2):
        y = kernels.int4_linear(x, qweight, scale, mins, group_size, bias)
    expected = reference(x, qweight, scale, mins, group_size, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert (y.double() - expected).abs().max() <= 2e-5 * expected.abs().max() + 1e-5


def test_bfloat16_activations_give_bfloat16_outputs():
    torch.manual_seed(0)
    qweight, scale, mins = random_grouped(64, 256, 32, 4, torch.float16)
    x = torch.randn(3, 256).to(torch.bfloat16)
    y = kernels.int4_linear(x, qweight, scale, mins, 32, None)
    expected = reference(x, qweight, scale, mins, 32, None)
    assert y.dtype == torch.bfloat16
    assert (y.double() - expected).abs().max() <= 1e-2 * expected.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
def test_native_dequantize_equals_the_pytorch_one(bits, scale_dtype):
    # long prefills dequantize through it; fp16 scales: q * scale is exact, so the bits are equal
    torch.manual_seed(bits)
    qweight, scale, mins = random_grouped(40, 576, 128, bits, scale_dtype)
    ours = kernels.grouped_dequantize(qweight, scale, mins, 128)
    expected = dequantize(qweight, scale, mins, 128)
    if scale_dtype is torch.float16:
        assert torch.equal(ours, expected)
    else:
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def test_bad_shapes_are_refused():
    qweight, scale, mins = random_grouped(8, 64, 32, 4, torch.float16)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        kernels.int4_linear(torch.randn(1, 64), qweight, scale, mins, 48, None)
    with pytest.raises(RuntimeError, match="scale and min"):
        kernels.int4_linear(torch.randn(1, 64), qweight, scale[:, :1], mins[:, :1], 32, None)


def test_packing_round_trips_and_follows_ggufs_block_order():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 32) and torch.equal(unpack_nibbles(packed), q)
    # byte j of a block: value j in the low nibble, value j + 16 in the high one
    assert torch.equal(packed[:, :16] & 0x0F, q[:, :16]) and torch.equal(packed[:, :16] >> 4, q[:, 16:32])


@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_int4_rounds_to_the_nearest_level_of_its_own_scale(group_size):
    torch.manual_seed(0)
    weight = torch.randn(16, 576) * torch.logspace(-2, 0, 16)[:, None]
    qweight, scale, mins = quantize_int4(weight, group_size)
    assert qweight.dtype == torch.uint8 and scale.dtype == torch.float16 and scale.shape == (16, -(-576 // group_size))
    w = dequantize(qweight, scale, mins, group_size)
    step = scale.float().repeat_interleave(group_size, dim=1)[:, :576]
    # half a step inside the grid; up to one step at a group's ends, where the integer zero point shifts it
    assert ((w - weight).abs() <= step + 1e-6).all()
    assert ((w - weight).abs() <= step / 2 + 1e-6).float().mean() > 0.95
    # zero points are integers: min / scale is a whole number in [-15, 0]
    zero = -mins.float() / scale.float()
    assert ((zero - zero.round()).abs() < 1e-2).all() and zero.min() >= 0 and zero.max() <= 15


def int8_activation_reference(x, qweight, scale, mins, group_size, bias):
    """What int4_linear_int8_activations computes, in float64: x rounded to int8 per block of 32 (scale =
    max |x| / 127) times the dequantized weight, with the min term on the exact sums of x."""
    rows, k = x.shape
    blocks = x.view(rows, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    rounded = (torch.round(blocks * inverse) * (amax / 127.0)).view(rows, k).double()
    scales_only = dequantize(qweight, scale, torch.zeros_like(mins), group_size, torch.float64)
    padded = torch.nn.functional.pad(x.double(), (0, mins.shape[1] * group_size - k))
    y = rounded @ scales_only.T + padded.view(rows, -1, group_size).sum(-1) @ mins.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("n,k,group_size", [(64, 256, 32), (36, 576, 128), (8, 96, 32), (1536, 576, 32)],
                         ids=["small", "ragged-last-group", "odd-block-count", "smollm2-mlp"])
# 1 and 3 rows: the row kernel; 4 and more: VNNI panels where the CPU has them (int8_panel.h), in tiles of 6, 5, 4
@pytest.mark.parametrize("rows", [1, 3, 4, 16, 32])
def test_int8_activation_kernel_matches_its_float64_reference(bits, scale_dtype, n, k, group_size, rows):
    torch.manual_seed(rows * 7 + n)
    qweight, scale, mins = random_grouped(n, k, group_size, bits, scale_dtype)
    x = torch.randn(rows, k)
    x[0, :32] = 0.0  # an all-zero block: scale 0, no division by zero
    bias = torch.randn(n) if rows % 2 else None
    with torch_threads(2):
        y = kernels.int4_linear_int8_activations(x, qweight, scale, mins, group_size, bias)
        float_activations = kernels.int4_linear(x, qweight, scale, mins, group_size, bias)
    expected = int8_activation_reference(x, qweight, scale, mins, group_size, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert (y.double() - expected).abs().max() <= 2e-5 * expected.abs().max() + 1e-5
    # the rounding of x is the only difference from the float kernel: small, not zero
    difference = (y - float_activations).norm() / float_activations.norm()
    assert 0 < difference < 0.03


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [2, 8])
def test_int8_activation_kernel_takes_bfloat16_and_refuses_bad_shapes(bits, rows):
    torch.manual_seed(1)
    qweight, scale, mins = random_grouped(68, 256, 32, bits, torch.float16)  # 68: a panel of 4 valid rows
    x = torch.randn(rows, 256).to(torch.bfloat16)
    y = kernels.int4_linear_int8_activations(x, qweight, scale, mins, 32, None)
    assert y.dtype == torch.bfloat16
    # the float32 sums rounded once to bf16, to nearest even as torch rounds
    assert torch.equal(y, kernels.int4_linear_int8_activations(x.float(), qweight, scale, mins, 32, None).bfloat16())
    expected = int8_activation_reference(x.float(), qweight, scale, mins, 32, None)
    assert (y.double() - expected).abs().max() <= 1e-2 * expected.abs().max()
    with pytest.raises(RuntimeError, match="multiples of 32"):
        kernels.int4_linear_int8_activations(torch.randn(1, 256), qweight, scale, mins, 48, None)
