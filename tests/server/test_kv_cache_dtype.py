"""--kv-cache-dtype fp8: K/V stored in float8 and widened on the way out; attention equals a float64
reference over the float8-rounded K/V, and the engine serves SmolLM2 from a float8 pool."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import build_metadata, torch_threads
from test_engine import make_engine, reference_greedy

from genserve.server.config import EngineConfig
from genserve.server.layers import kv_storage
from genserve.server.layers.attention import Attention, choose_decode_backend, forward_context
from genserve.server.sampling_params import SamplingParams

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_store_and_load_round_trip_through_float8(dtype):
    cache = torch.zeros(12, 2, 8, dtype=dtype)
    values = torch.randn(3, 2, 8)
    slots = torch.tensor([4, 0, 9])
    kv_storage.store(cache, slots, values)
    got = kv_storage.load(cache, torch.tensor([9, 4]), torch.float32)
    assert torch.equal(got, values[[2, 0]].to(dtype).float())
    assert not torch.equal(got, values[[2, 0]])  # really rounded
    same = torch.zeros(5, 2, 8)
    kv_storage.store(same, torch.tensor([1]), values[:1])
    assert torch.equal(kv_storage.load(same, torch.tensor([1]), torch.float32), values[:1])


def _reference(q, keys, values, scale):
    # q [B, H, D], keys/values [B, L, KVH, D] (already rounded) -> [B, H, D], float64
    group = q.shape[1] // keys.shape[2]
    k = keys.double().repeat_interleave(group, 2).transpose(1, 2)
    v = values.double().repeat_interleave(group, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(q.double()[:, :, None], k, v, scale=scale)[:, :, 0]


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_decode_and_prefill_over_a_float8_pool_equal_the_rounded_reference(dtype):
    torch.manual_seed(0)
    heads, kv_heads, dim, scale = 4, 2, 16, 0.25
    attn = Attention(heads, kv_heads, dim, scale)
    attn.k_cache = torch.zeros(64, kv_heads, dim, dtype=dtype)
    attn.v_cache = torch.zeros(64, kv_heads, dim, dtype=dtype)
    lens = [9, 5]
    contexts = [list(range(0, 9)), list(range(20, 25))]
    k_all, v_all = torch.randn(64, kv_heads, dim), torch.randn(64, kv_heads, dim)
    for ctx in contexts:  # earlier tokens already in the pool
        kv_storage.store(attn.k_cache, torch.tensor(ctx[:-1]), k_all[ctx[:-1]])
        kv_storage.store(attn.v_cache, torch.tensor(ctx[:-1]), v_all[ctx[:-1]])
    meta = build_metadata(decode_contexts=contexts)
    q = torch.randn(2, heads * dim)
    new_k = torch.stack([k_all[ctx[-1]] for ctx in contexts]).view(2, -1)
    new_v = torch.stack([v_all[ctx[-1]] for ctx in contexts]).view(2, -1)
    with torch.inference_mode(), forward_context(meta):
        out = attn(q, new_k, new_v).view(2, heads, dim)
    for b, ctx in enumerate(contexts):
        keys = k_all[ctx].to(dtype).float()[None]
        values = v_all[ctx].to(dtype).float()[None]
        expected = _reference(q.view(2, heads, dim)[b:b + 1], keys, values, scale)
        assert torch.allclose(out[b:b + 1].double(), expected, atol=1e-5), lens[b]
    # a prefill chunk over a cached prefix reads the prefix back from float8 too
    ctx = list(range(30, 40))
    kv_storage.store(attn.k_cache, torch.tensor(ctx[:6]), k_all[ctx[:6]])
    kv_storage.store(attn.v_cache, torch.tensor(ctx[:6]), v_all[ctx[:6]])
    meta = build_metadata(prefill_contexts=[(ctx, 4)])
    q = torch.randn(4, heads * dim)
    with torch.inference_mode(), forward_context(meta):
        out = attn(q, k_all[ctx[6:]].reshape(4, -1), v_all[ctx[6:]].reshape(4, -1)).view(4, heads, dim)
    keys, values = k_all[ctx].to(dtype).float(), v_all[ctx].to(dtype).float()
    for j in range(4):
        visible = 6 + j + 1
        expected = _reference(q.view(4, heads, dim)[j:j + 1], keys[None, :visible], values[None, :visible], scale)
        assert torch.allclose(out[j:j + 1].double(), expected, atol=1e-5)


def test_in_place_backends_are_never_chosen_for_float8(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_decode_backend(cpu, torch.float32, 64, 16, kv_float8=True) == ("gather", False)
    monkeypatch.setenv("GENSERVE_DECODE_ATTENTION", "kernel")
    with pytest.raises(ValueError, match="not --kv-cache-dtype fp8"):
        choose_decode_backend(cpu, torch.float32, 64, 16, kv_float8=True)


def test_bad_kv_cache_dtype_is_one_line():
    with pytest.raises(ValueError, match="`--kv-cache-dtype` must be auto, fp8_e4m3fn or fp8_e5m2"):
        EngineConfig(kv_cache_dtype="int4")


def test_engine_serves_from_a_float8_pool(smollm2_dir):
    """A quarter of the float32 pool's bytes; greedy output close to transformers (float8 K/V round, so
    not token-exact): the first token (prefill attends its fresh K/V) exact, most of the rest equal."""
    with torch_threads(2):
        engine = make_engine(smollm2_dir, kv_cache_dtype="fp8_e4m3fn")
        runner = engine.runner
        assert runner.kv_dtype == torch.float8_e4m3fn and runner.decode_backend == "gather"
        layer = runner.attention_layers[0]
        assert layer.k_cache.dtype == torch.float8_e4m3fn and layer.k_cache.element_size() == 1
        prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
        ids = [engine.tokenizer.encode(p) for p in prompts]
        request_ids = [engine.add_request(p, SamplingParams(max_new_tokens=16)) for p in ids]
        got = {r: [] for r in request_ids}
        while engine.has_unfinished:
            for output in engine.step()[0]:
                got[output.request_id].extend(t.id for t in output.new_tokens)
        expected = reference_greedy(smollm2_dir, ids, 16)
    same = 0
    for request_id, reference in zip(request_ids, expected, strict=True):
        assert got[request_id][0] == reference[0]
        same += sum(a == b for a, b in zip(got[request_id], reference, strict=True))
    assert same >= 0.75 * 16 * len(prompts), (same, got, expected)
