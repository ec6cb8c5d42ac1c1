"""Decode attention backends against each other and a float64 reference, on random paged pools.

`varlen` and `flash_paged` call FlashAttention on CUDA; here a stand-in with varlen_attn's documented
semantics (packed or paged K/V, cumulative lengths, seqused_k, block_table) runs in its place, so the
arguments the CUDA branch builds are checked on CPU too.
"""

from __future__ import annotations

import pytest
import torch
from model_helpers import save_tiny_llama
from test_engine import make_engine, run_staggered
from test_paged_kernel import MODS, alibi_slopes, paged_case, reference
from transformers import AutoTokenizer

from genserve.server import kernels
from genserve.server.layers import attention
from genserve.server.layers.attention import (
    Attention,
    AttentionMetadata,
    choose_decode_backend,
    forward_context,
    set_decode_metadata,
)
from genserve.server.sampling_params import SamplingParams

BS = 16
SHAPES = [(9, 3, 64), (4, 4, 128), (8, 2, 64), (6, 1, 32)]  # (heads, kv heads, head_dim): GQA, MHA, MQA


def fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False, seqused_k=None, block_table=None, **_):
    """varlen_attn's semantics in plain PyTorch, with the checks FlashAttention makes on its inputs; causal
    (window (-1, 0)) aligns each sequence's queries to the end of its keys, as FlashAttention 2 does."""
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and enable_gqa
    assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
    left, right = window_size
    assert right in (-1, 0) and (left == -1 or right == 0)
    group = query.shape[1] // key.shape[-2]
    out = torch.empty_like(query)
    for b in range(cu_seq_q.shape[0] - 1):
        q_start, q_end = int(cu_seq_q[b]), int(cu_seq_q[b + 1])
        if block_table is not None:
            assert block_table.dtype == seqused_k.dtype == torch.int32 and key.dim() == 4
            page = key.shape[1]
            rows = [(int(block_table[b, t // page]), t % page) for t in range(int(seqused_k[b]))]
            keys = torch.stack([key[p, o] for p, o in rows])
            values = torch.stack([value[p, o] for p, o in rows])
        else:
            start, end = int(cu_seq_k[b]), int(cu_seq_k[b + 1])
            keys, values = key[start:end], value[start:end]
        num_q, num_k = q_end - q_start, keys.shape[0]
        assert num_q <= max_q and num_k <= max_k
        keys, values = keys.repeat_interleave(group, 1).float(), values.repeat_interleave(group, 1).float()
        scores = torch.einsum("qhd,thd->hqt", query[q_start:q_end].float(), keys) * scale
        if right == 0:  # causal, and with left >= 0 a window of left + 1 keys (bottom-right aligned)
            relative = torch.arange(num_k)[None, :] - torch.arange(num_k - num_q, num_k)[:, None]
            visible = (relative <= 0) & ((relative >= -left) if left >= 0 else True)
            scores = scores.masked_fill(~visible, float("-inf"))
        out[q_start:q_end] = torch.einsum("hqt,thd->qhd", scores.softmax(-1), values).to(query.dtype)
    return out


@pytest.fixture
def fake_flash(monkeypatch):
    monkeypatch.setattr(attention, "varlen_attn", fake_varlen_attn)


def decode(backend, q, k_cache, v_cache, tables, lens, block_size=BS, flash=False, **mods):
    """Attention._decode through `backend`, as the layer runs it inside a step."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    layer = Attention(num_heads, k_cache.shape[1], head_dim, head_dim ** -0.5, **mods)
    layer.k_cache, layer.v_cache = k_cache, v_cache
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=q.shape[0])
    set_decode_metadata(meta, backend, tables, lens, block_size, int(lens.max()), lens.tolist(), flash)
    return layer._decode(q, meta)


LENS = [1, 15, 16, 17, 33, 100, 228, 5, 64]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_every_backend_matches_the_reference(dtype, tol, shape, fake_flash):
    q, k_cache, v_cache, tables, lens = paged_case(LENS, *shape, dtype)
    expected = reference(q, k_cache, v_cache, tables, lens, shape[2] ** -0.5)
    outputs = {
        "gather": decode("gather", q, k_cache, v_cache, tables, lens),
        "varlen": decode("varlen", q, k_cache, v_cache, tables, lens),
        "varlen (FlashAttention)": decode("varlen", q, k_cache, v_cache, tables, lens, flash=True),
    }
    if shape[2] in kernels.SUPPORTED_HEAD_DIMS and kernels.load_cpu_kernels():
        outputs["kernel"] = decode("kernel", q, k_cache, v_cache, tables, lens)
    for name, out in outputs.items():
        assert out.dtype == dtype and out.shape == q.shape, name
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol, msg=name)
    # the pure-PyTorch varlen path and today's paths agree to float rounding
    torch.testing.assert_close(outputs["varlen"], outputs["gather"], atol=tol, rtol=tol)


@pytest.mark.parametrize("window,softcap,alibi", MODS, ids=lambda m: str(m))
def test_every_backend_applies_window_softcap_and_alibi(window, softcap, alibi, fake_flash):
    q, k_cache, v_cache, tables, lens = paged_case([*LENS, 4, 6], 8, 2, 64, torch.float32, seed=11)
    q = q * 4  # logits large enough that soft-capping changes them
    mods = dict(sliding_window=window, logit_softcap=softcap, alibi_slopes=alibi_slopes(8) if alibi else None)
    expected = reference(q, k_cache, v_cache, tables, lens, 0.125, window=window, softcap=softcap,
                         alibi_slopes=mods["alibi_slopes"])
    backends = [("gather", False), ("varlen", False)]
    if kernels.load_cpu_kernels():
        backends.append(("kernel", False))
    if not softcap and not alibi:  # FlashAttention takes a window only
        backends.append(("varlen", True))
    for backend, flash in backends:
        out = decode(backend, q, k_cache, v_cache, tables, lens, flash=flash, **mods)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5, msg=f"{backend} flash={flash}")
    if window and not softcap and not alibi:
        block = 256
        q, k_cache, v_cache, tables, lens = paged_case([1, 255, 300, 700], 8, 2, 64, torch.float32,
                                                       block_size=block, seed=3)
        out = decode("flash_paged", q, k_cache, v_cache, tables, lens, block_size=block, flash=True, **mods)
        expected = reference(q, k_cache, v_cache, tables, lens, 0.125, block_size=block, window=window)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mods", [dict(logit_softcap=30.0), dict(alibi_slopes=alibi_slopes(8))], ids=["softcap", "alibi"])
def test_flashattention_refuses_scores_it_cannot_change(mods, fake_flash, monkeypatch):
    q, k_cache, v_cache, tables, lens = paged_case([5, 20], 8, 2, 64, torch.float32)
    with pytest.raises(RuntimeError, match="cannot apply logit soft-capping or ALiBi"):
        decode("varlen", q, k_cache, v_cache, tables, lens, flash=True, **mods)
    # the runner's choice never lands there, and asking for it by name is a clear error
    monkeypatch.setattr(attention, "flash_attention_usable", lambda *args: True)
    cuda = torch.device("cuda")
    monkeypatch.delenv("GENSERVE_DECODE_ATTENTION", raising=False)
    assert choose_decode_backend(cuda, torch.bfloat16, 64, 256) == ("flash_paged", True)
    assert choose_decode_backend(cuda, torch.bfloat16, 64, 256, score_mods=True) == ("gather", False)
    monkeypatch.setenv("GENSERVE_DECODE_ATTENTION", "varlen")
    assert choose_decode_backend(cuda, torch.bfloat16, 64, 16, score_mods=True) == ("varlen", False)
    monkeypatch.setenv("GENSERVE_DECODE_ATTENTION", "flash_paged")
    with pytest.raises(ValueError, match="no attention logit soft-capping or ALiBi"):
        choose_decode_backend(cuda, torch.bfloat16, 64, 256, score_mods=True)


def test_flash_paged_reads_the_pool_in_place_through_pages_of_256(fake_flash):
    block = 256
    q, k_cache, v_cache, tables, lens = paged_case([1, 255, 256, 257, 700, 40], 8, 2, 64, torch.bfloat16,
                                                   block_size=block, seed=3)
    expected = reference(q, k_cache, v_cache, tables, lens, 64 ** -0.5, block_size=block)
    out = decode("flash_paged", q, k_cache, v_cache, tables, lens, block_size=block, flash=True)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_packed_index_lists_every_context_slot_in_order():
    _, _, _, tables, lens = paged_case([3, 17, 1, 32], 2, 1, 32, torch.float32)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
    set_decode_metadata(meta, "varlen", tables, lens, BS, 32, lens.tolist())
    expected = [tables[b, t // BS].item() * BS + t % BS for b, n in enumerate(lens.tolist()) for t in range(n)]
    assert meta.decode_slots.tolist() == expected
    assert meta.decode_host_cu_lens == [0, 3, 20, 21, 53]
    assert meta.decode_cu_lens.tolist() == [0, 3, 20, 21, 53]
    assert meta.decode_cu_lens.dtype == torch.int32


def test_varlen_ignores_slots_past_the_contexts():
    q, k_cache, v_cache, tables, lens = paged_case([20, 40, 7], 6, 2, 64, torch.float32)
    before = decode("varlen", q, k_cache, v_cache, tables, lens)
    used = {tables[b, t // BS].item() * BS + t % BS for b, n in enumerate(lens.tolist()) for t in range(n)}
    for slot in set(range(k_cache.shape[0])) - used:
        k_cache[slot] = v_cache[slot] = float("nan")
    torch.testing.assert_close(decode("varlen", q, k_cache, v_cache, tables, lens), before, atol=0, rtol=0)


def test_the_layer_gives_the_same_output_through_every_backend(fake_flash):
    # a whole Attention.forward: new K/V written by slot, then read back by each backend
    lens = [5, 40, 17]
    q, k_cache, v_cache, tables, context_lens = paged_case(lens, 9, 3, 64, torch.float32, seed=5)
    gen = torch.Generator().manual_seed(1)
    new_k, new_v = torch.randn(3, 3 * 64, generator=gen), torch.randn(3, 3 * 64, generator=gen)
    last = context_lens - 1
    slot_mapping = tables[torch.arange(3), last // BS] * BS + last % BS
    layer = Attention(9, 3, 64, 0.125)

    def run(backend, flash=False):
        layer.k_cache, layer.v_cache = k_cache.clone(), v_cache.clone()
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode_tokens=3)
        set_decode_metadata(meta, backend, tables, context_lens, BS, max(lens), lens, flash)
        with torch.inference_mode(), forward_context(meta):
            return layer(q.reshape(3, -1), new_k, new_v)

    expected = run("gather")
    for backend, flash in [("varlen", False), ("varlen", True)]:
        torch.testing.assert_close(run(backend, flash), expected, atol=1e-5, rtol=1e-5)


def test_backend_choice_and_its_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("GENSERVE_DECODE_ATTENTION", raising=False)
    expected = "kernel" if kernels.load_cpu_kernels() else "gather"
    assert choose_decode_backend(cpu, torch.float32, 64, 16) == (expected, False)
    assert choose_decode_backend(cpu, torch.float32, 16, 16) == ("gather", False)  # no kernel for head_dim 16
    monkeypatch.setenv("GENSERVE_DECODE_ATTENTION", "varlen")
    assert choose_decode_backend(cpu, torch.float32, 64, 16) == ("varlen", False)
    monkeypatch.setenv("GENSERVE_DECODE_ATTENTION", "flash_paged")
    with pytest.raises(ValueError, match="multiple of 256"):
        choose_decode_backend(cpu, torch.bfloat16, 64, 256)
    monkeypatch.setenv("GENSERVE_DECODE_ATTENTION", "paged")
    with pytest.raises(ValueError, match="auto or one of kernel, gather, varlen, flash_paged"):
        choose_decode_backend(cpu, torch.float32, 64, 16)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-varlen"), smollm2_dir, num_kv_heads=2)


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["Hello, my name is", "The capital of France is", "1, 2, 3, 4,", "Once upon a time there was",
             "def fibonacci(n):", "Q: What is 2+2?\nA:"]
    return [tok.encode(t) for t in texts]


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_engine_greedy_tokens_equal_through_varlen(model, tiny_dir, smollm2_dir, prompts, monkeypatch):
    # SmolLM2 (head_dim 64) compares with the native kernel where it builds, the tiny model with gather
    engine = make_engine(tiny_dir if model == "tiny" else smollm2_dir)
    params = SamplingParams(max_new_tokens=12)
    default = run_staggered(engine, prompts, params, first_batch=3)
    engine.runner.decode_backend, engine.runner.decode_flash = "varlen", False
    assert run_staggered(engine, prompts, params, first_batch=3) == default
    assert engine.kv_cache.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 100], ids=["full", "window"])
@pytest.mark.parametrize("backend,block_size", [("varlen", 16), ("flash_paged", 256), ("gather", 16)])
def test_cuda_backends_match_the_reference(backend, block_size, window):
    cuda = torch.device("cuda")
    flash = backend != "gather"
    if flash and not attention.flash_attention_usable(cuda, torch.bfloat16, 128):
        pytest.skip("no FlashAttention on this GPU")
    lens = [*LENS, 1000, 2047, 4096]
    q, k_cache, v_cache, tables, context_lens = paged_case(lens, 32, 8, 128, torch.bfloat16, block_size=block_size)
    expected = reference(q, k_cache, v_cache, tables, context_lens, 128 ** -0.5, block_size=block_size,
                         window=window)
    out = decode(backend, q.to(cuda), k_cache.to(cuda), v_cache.to(cuda), tables.to(cuda), context_lens.to(cuda),
                 block_size=block_size, flash=flash, sliding_window=window)
    torch.testing.assert_close(out.cpu().double(), expected, atol=2e-2, rtol=2e-2)


def test_engine_tokens_equal_with_flashattention_prefill_and_decode(tiny_dir, prompts, monkeypatch):
    # the CUDA branches (one varlen call for every prefill chunk, varlen decode) with the stand-in:
    # chunked prompts (16-token budget) and prefix-cache hits (a shared 32-token prefix) included
    shared = [t for p in prompts for t in p]  # 40 tokens and more: two full blocks shared by every prompt
    repeated = [shared[:40 + i] for i in (0, 3, 5, 1, 7, 2)]
    engine = make_engine(tiny_dir, max_batch_prefill_tokens=16)
    params = SamplingParams(max_new_tokens=6)
    expected = run_staggered(engine, repeated, params, first_batch=3)
    runner = engine.runner
    runner.prefill_flash, runner.decode_backend, runner.decode_flash = True, "varlen", True
    queries = []

    def counting(query, *args, **kwargs):
        queries.append(query.shape[0])
        return fake_varlen_attn(query, *args, **kwargs)

    monkeypatch.setattr(attention, "varlen_attn", counting)
    hits = engine.kv_cache.prefix_cache_hits
    assert run_staggered(engine, repeated, params, first_batch=3) == expected
    assert engine.kv_cache.prefix_cache_hits > hits
    assert max(queries) > 1  # prefill chunks went through it, not only decodes
