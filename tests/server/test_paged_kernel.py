"""The native CPU paged decode attention against a float64 reference, and inside the Attention layer."""

from __future__ import annotations

import random

import pytest
import torch

from genserve.server import kernels
from genserve.server.layers.attention import Attention, AttentionMetadata, forward_context

pytestmark = pytest.mark.skipif(not kernels.load_cpu_kernels(), reason="no C++ toolchain to build the kernel")

BLOCK_SIZE = 16


def paged_case(context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype, seed: int = 0,
               block_size: int = BLOCK_SIZE):
    """Random K/V pools whose blocks are handed out in shuffled order, as a busy cache would."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in context_lens]
    free = list(range(sum(needed) + 3))
    rng.shuffle(free)
    width = max(needed)
    tables = []
    for n in needed:
        tables.append(free[:n] + [0] * (width - n))
        free = free[n:]
    slots = (sum(needed) + 3) * block_size
    k_cache = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, torch.tensor(tables), torch.tensor(context_lens)


def reference(q, k_cache, v_cache, tables, lens, scale, block_size: int = BLOCK_SIZE, window: int | None = None,
              softcap: float | None = None, alibi_slopes: torch.Tensor | None = None):
    """Float64 decode attention, transformers' semantics: keys at positions (p - window, p] for the query at
    p = len - 1; scores soft-capped (c * tanh(s / c)), then + slope[h] * (key position - p)."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, n in enumerate(lens.tolist()):
        first = 0 if window is None else max(0, n - window)
        slots = [tables[b, t // block_size].item() * block_size + t % block_size for t in range(first, n)]
        keys = k_cache[slots].double().repeat_interleave(group, dim=1)  # [n, H, D]
        values = v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].double(), keys) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if alibi_slopes is not None:
            relative = torch.arange(first, n, dtype=torch.float64) - (n - 1)
            scores = scores + alibi_slopes.double()[:, None] * relative[None, :]
        out[b] = torch.einsum("ht,thd->hd", scores.softmax(-1), values)
    return out


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """BLOOM's slopes for a power of two number of heads, and the interleaved extra ones otherwise."""
    import math

    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (i + 1) for i in range(0, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


# (window, softcap, alibi): a window shorter than a block, one across blocks, soft-capping, ALiBi, all three
MODS = [(5, None, False), (40, None, False), (None, 2.0, False), (None, None, True), (20, 1.5, True)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (8, 2, 64), (2, 1, 256)])
def test_kernel_matches_reference(dtype, tol, num_heads, num_kv_heads, head_dim):
    # lengths on both sides of block boundaries, a single token, and one much longer context
    lens = [1, 15, 16, 17, 33, 100, 228, 5]
    q, k_cache, v_cache, tables, context_lens = paged_case(lens, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim ** -0.5
    out = kernels.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, BLOCK_SIZE, scale)
    assert out.dtype == dtype and out.shape == q.shape
    expected = reference(q, k_cache, v_cache, tables, context_lens, scale)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window,softcap,alibi", MODS, ids=lambda m: str(m))
def test_kernel_window_softcap_alibi_match_reference(dtype, tol, window, softcap, alibi):
    lens = [1, 4, 5, 6, 15, 16, 17, 33, 100, 228]
    q, k_cache, v_cache, tables, context_lens = paged_case(lens, 8, 2, 64, dtype, seed=7)
    slopes = alibi_slopes(8) if alibi else None
    # logits large enough that soft-capping changes them
    q = (q.float() * 4).to(dtype)
    out = kernels.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, BLOCK_SIZE, 0.125, window,
                                         softcap, slopes)
    expected = reference(q, k_cache, v_cache, tables, context_lens, 0.125, window=window, softcap=softcap,
                         alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    if window or softcap:  # the option changed the answer, so the test sees it
        plain = reference(q, k_cache, v_cache, tables, context_lens, 0.125)
        assert (plain - expected).abs().max() > 10 * tol


def test_kernel_with_a_window_never_reads_blocks_before_it():
    lens = [40, 70, 9]
    q, k_cache, v_cache, tables, context_lens = paged_case(lens, 4, 2, 64, torch.float32, seed=2)
    window = 20
    before = kernels.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, BLOCK_SIZE, 0.125, window)
    # blocks wholly before each window: freed, so their ids may be anything, and their slots garbage
    tables = tables.clone()
    for b, n in enumerate(lens):
        for blk in range(max(0, n - window) // BLOCK_SIZE):
            k_cache[tables[b, blk] * BLOCK_SIZE:(tables[b, blk] + 1) * BLOCK_SIZE] = float("nan")
            tables[b, blk] = 10**6
    after = kernels.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, BLOCK_SIZE, 0.125, window)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="outside the pool"):  # without the window the check still holds
        kernels.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, BLOCK_SIZE, 0.125)
    with pytest.raises(RuntimeError, match="alibi_slopes must be float32"):
        kernels.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, BLOCK_SIZE, 0.125, window,
                                       None, torch.ones(3))


def test_kernel_ignores_blocks_past_the_context():
    q, k_cache, v_cache, tables, lens = paged_case([20, 40], 6, 2, 64, torch.float32)
    before = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, BLOCK_SIZE, 0.125)
    # poison every slot the contexts do not cover, including the rest of their last blocks
    used = {tables[b, t // BLOCK_SIZE].item() * BLOCK_SIZE + t % BLOCK_SIZE
            for b, n in enumerate(lens.tolist()) for t in range(n)}
    for slot in range(k_cache.shape[0]):
        if slot not in used:
            k_cache[slot] = float("nan")
            v_cache[slot] = float("nan")
    after = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, BLOCK_SIZE, 0.125)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("head_dim", [64, 96])
def test_kernel_rejects_bad_input(head_dim):
    q, k_cache, v_cache, tables, lens = paged_case([3], 4, 2, head_dim, torch.float32)
    if head_dim == 96:
        with pytest.raises(RuntimeError, match="head_dim must be 64, 128 or 256"):
            kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, BLOCK_SIZE, 1.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernels.paged_decode_attention(q.double(), k_cache, v_cache, tables, lens, BLOCK_SIZE, 1.0)
    with pytest.raises(RuntimeError, match="int64 tables"):
        kernels.paged_decode_attention(q, k_cache, v_cache, tables.int(), lens, BLOCK_SIZE, 1.0)
    with pytest.raises(RuntimeError, match="same shape"):
        kernels.paged_decode_attention(q, k_cache, v_cache[:-1], tables, lens, BLOCK_SIZE, 1.0)
    with pytest.raises(RuntimeError, match="one block-table row"):
        kernels.paged_decode_attention(q, k_cache, v_cache, tables[:0], lens, BLOCK_SIZE, 1.0)
    with pytest.raises(RuntimeError, match="whole blocks"):
        kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0, 1.0)
    if head_dim == 64:  # tables and lengths that would read outside the pool are refused, not followed
        with pytest.raises(RuntimeError, match="outside the pool"):
            kernels.paged_decode_attention(q, k_cache, v_cache, tables + 1000, lens, BLOCK_SIZE, 1.0)
        with pytest.raises(RuntimeError, match="context length 0"):
            kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens * 0, BLOCK_SIZE, 1.0)
        with pytest.raises(RuntimeError, match="context length 17"):
            kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens * 0 + 17, BLOCK_SIZE, 1.0)


def test_attention_layer_kernel_path_equals_gather_path():
    """The same decode step through the layer, once with block tables (kernel), once with the gather."""
    lens = [7, 16, 31, 64]
    q, k_cache, v_cache, tables, context_lens = paged_case(lens, 9, 3, 64, torch.float32, seed=3)
    layer = Attention(num_heads=9, num_kv_heads=3, head_dim=64, scale=0.125)
    last = context_lens - 1
    slot_mapping = tables[torch.arange(len(lens)), last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE
    new_k = torch.randn(len(lens), 3 * 64)
    new_v = torch.randn(len(lens), 3 * 64)
    flat_q = q.reshape(len(lens), -1)

    def run(meta: AttentionMetadata) -> torch.Tensor:
        layer.k_cache, layer.v_cache = k_cache.clone(), v_cache.clone()
        with torch.inference_mode(), forward_context(meta):
            return layer(flat_q, new_k, new_v)

    kernel_meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode_tokens=len(lens),
                                    decode_block_tables=tables, decode_context_lens=context_lens,
                                    block_size=BLOCK_SIZE)
    width = tables.shape[1] * BLOCK_SIZE
    gather = (tables[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(len(lens), width)[:, :max(lens)]
    mask = (torch.arange(max(lens))[None, :] < context_lens[:, None]).view(len(lens), 1, 1, -1)
    gather_meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode_tokens=len(lens),
                                    decode_gather_index=gather, decode_mask=mask)
    torch.testing.assert_close(run(kernel_meta), run(gather_meta), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_fused_elementwise_kernels_match_pytorch(dtype, rows):
    from genserve.server.layers.norm import RMSNorm

    if not kernels.load_cpu_kernels():
        pytest.skip("no C++ compiler here: the native kernels cannot build")
    torch.manual_seed(rows)
    x = torch.randn(rows, 2 * 1536, dtype=dtype) * 3
    gate, up = x.float().view(rows, 2, -1).unbind(1)
    expected = (torch.nn.functional.silu(gate.to(dtype)).float() * up).to(dtype)
    torch.testing.assert_close(kernels.silu_and_mul(x), expected, atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    hidden, residual = torch.randn(rows, 576, dtype=dtype), torch.randn(rows, 576, dtype=dtype) * 4
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data = (torch.rand(576) + 0.5).to(dtype)
    expected_residual = residual.clone()
    expected_out = norm._norm(expected_residual.add_(hidden))
    ours_residual = residual.clone()
    out = kernels.rms_norm(hidden, ours_residual, norm.weight, 1e-5)
    assert torch.equal(ours_residual, expected_residual)  # the residual add rounds exactly as add_ does
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected_out, **tolerance)
    torch.testing.assert_close(kernels.rms_norm(hidden, None, norm.weight, 1e-5), norm._norm(hidden), **tolerance)
    with pytest.raises(RuntimeError, match="weight"):
        kernels.rms_norm(hidden, None, norm.weight[:10], 1e-5)
