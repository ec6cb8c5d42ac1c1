"""Sliding-window attention (Mistral, Qwen2), soft-capping and ALiBi: the layer against a float64
reference in chunked prefill with a cached prefix, and tiny random Mistral / Qwen2 models against
transformers (logits, then greedy ids through the engine and over HTTP) once prompts outgrow the window."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import transformers
from model_helpers import torch_threads
from test_decode_attention import fake_varlen_attn
from test_engine import make_engine, run_staggered
from test_paged_kernel import alibi_slopes
from transformers import AutoTokenizer

from genserve.server.layers import attention
from genserve.server.layers.attention import Attention, AttentionMetadata, forward_context
from genserve.server.models.llama import layer_sliding_window
from genserve.server.sampling_params import SamplingParams

WINDOW = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def reference_attention(q, k, v, scale, window=None, softcap=None, slopes=None):
    """Float64 causal attention over one whole sequence: q [N, H, D], k, v [N, KVH, D] -> [N, H, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    n = q.shape[0]
    relative = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query position
    if slopes is not None:
        scores = scores + slopes.double()[:, None, None] * relative
    visible = relative <= 0
    if window is not None:
        visible &= relative > -window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def chunked_prefill(layer, q, k, v, chunks, decode_first=False, flash=False):
    """Run one sequence through `layer` in prefill chunks (the later ones with a cached prefix); with
    `decode_first`, its last token is a decode row instead. Slots are shuffled, as a busy pool's are."""
    n = q.shape[0]
    slots = torch.randperm(n + 8, generator=torch.Generator().manual_seed(1))[:n]
    layer.k_cache = torch.zeros(n + 8, k.shape[1], k.shape[2])
    layer.v_cache = torch.zeros_like(layer.k_cache)
    out = torch.empty_like(q)
    begin = 0
    for end in chunks:
        meta = AttentionMetadata(slot_mapping=slots[begin:end], prefill_starts=[0, end - begin],
                                 prefill_context_lens=[end], prefill_gather_index=[slots[:end] if begin else None])
        if flash:
            meta.prefill_flash, meta.prefill_slots = True, slots[:end]
            meta.prefill_cu_queries = torch.tensor([0, end - begin], dtype=torch.int32)
            meta.prefill_cu_lens = torch.tensor([0, end], dtype=torch.int32)
        if decode_first and end == n and end - begin == 1:
            meta = AttentionMetadata(slot_mapping=slots[begin:end], num_decode_tokens=1, decode_backend="gather")
            index = slots[:end][None, :]
            meta.decode_gather_index, meta.decode_context_lens = index, torch.tensor([end])
            meta.decode_mask = torch.ones(1, 1, 1, end, dtype=torch.bool)
        with torch.inference_mode(), forward_context(meta):
            out[begin:end] = layer(q[begin:end].flatten(1), k[begin:end].flatten(1),
                                   v[begin:end].flatten(1)).view(end - begin, *q.shape[1:])
        begin = end
    return out


MODS = [dict(sliding_window=WINDOW), dict(sliding_window=5), dict(logit_softcap=1.5),
        dict(alibi_slopes=alibi_slopes(8)), dict(sliding_window=WINDOW, logit_softcap=1.5, alibi_slopes=alibi_slopes(8))]


@pytest.mark.parametrize("mods", MODS, ids=lambda m: "+".join(m))
@pytest.mark.parametrize("chunks", [[50], [20, 37, 49, 50], [7, 8, 30, 50]], ids=["whole", "chunked", "short"])
def test_prefill_with_cached_prefix_matches_the_reference(mods, chunks):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(50, h, 32, generator=gen) * 2 for h in (8, 2, 2))
    layer = Attention(8, 2, 32, 32 ** -0.5, **mods)
    expected = reference_attention(q, k, v, 32 ** -0.5, mods.get("sliding_window"), mods.get("logit_softcap"),
                                   mods.get("alibi_slopes"))
    torch.testing.assert_close(chunked_prefill(layer, q, k, v, chunks).double(), expected, atol=1e-5, rtol=1e-5)
    # the last token as a decode row after the chunks agrees too
    decoded = chunked_prefill(layer, q, k, v, [c for c in chunks if c < 49] + [49, 50], decode_first=True)
    torch.testing.assert_close(decoded.double(), expected, atol=1e-5, rtol=1e-5)
    plain = reference_attention(q, k, v, 32 ** -0.5)
    assert (plain - expected).abs().max() > 1e-2  # the option changes the answer


def test_flashattention_prefill_takes_the_window(monkeypatch):
    monkeypatch.setattr(attention, "varlen_attn", fake_varlen_attn)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(50, h, 32, generator=gen) for h in (8, 2, 2))
    layer = Attention(8, 2, 32, 32 ** -0.5, sliding_window=WINDOW)
    out = chunked_prefill(layer, q, k, v, [20, 37, 50], flash=True)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 32 ** -0.5, WINDOW), atol=1e-5, rtol=1e-5)
    capped = Attention(8, 2, 32, 32 ** -0.5, logit_softcap=30.0)
    with pytest.raises(RuntimeError, match="cannot apply logit soft-capping or ALiBi"):
        chunked_prefill(capped, q, k, v, [50], flash=True)


def test_bad_attention_options_are_refused():
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        Attention(4, 2, 32, 1.0, sliding_window=0)
    with pytest.raises(ValueError, match="logit_softcap must be positive"):
        Attention(4, 2, 32, 1.0, logit_softcap=-1.0)
    with pytest.raises(ValueError, match="one slope per head"):
        Attention(4, 2, 32, 1.0, alibi_slopes=torch.ones(3))


def test_layer_windows_follow_transformers_config_rules():
    mistral = transformers.MistralConfig(num_hidden_layers=3, sliding_window=32)
    assert [layer_sliding_window(mistral, i) for i in range(3)] == [32, 32, 32]
    assert layer_sliding_window(transformers.MistralConfig(sliding_window=None), 0) is None
    qwen2 = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=32,
                                     max_window_layers=2)
    assert [layer_sliding_window(qwen2, i) for i in range(4)] == [None, None, 32, 32]
    off = transformers.Qwen2Config(num_hidden_layers=2, use_sliding_window=False, sliding_window=32)
    assert [layer_sliding_window(off, i) for i in range(2)] == [None, None]


def save_tiny_model(path, tokenizer_dir, family: str):
    """A random 2-3 layer Mistral (every layer slides) or Qwen2 (layer 0 full, the others slide) with
    SmolLM2's tokenizer; head_dim 64 so the native CPU kernel serves decode."""
    torch.manual_seed(0)
    common = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, max_position_embeddings=512,
                  initializer_range=0.3, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
                  sliding_window=WINDOW)
    if family == "mistral":
        config = transformers.MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=64, **common)
    else:
        config = transformers.Qwen2Config(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                          use_sliding_window=True, max_window_layers=1, **common)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def tiny_dir(request, tmp_path_factory, smollm2_dir):
    return save_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}-window"), smollm2_dir, request.param)


TEXTS = ["The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill.",
         "In 1492 Columbus sailed the ocean blue, and in the years after that many more ships crossed",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
         "Once upon a time, in a land far away, there lived a king who had three daughters and a",
         "Q: What is the capital of France? A: Paris. Q: What is the capital of Italy? A: Rome. Q: Spain?",
         "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,"]


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = [tok.encode(t) for t in TEXTS]
    assert all(len(p) > WINDOW for p in ids)
    return ids


def hf_greedy(model_dir, prompts_ids, max_new):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False)[0, len(p):].tolist()
                for p in prompts_ids]


@pytest.fixture(scope="module")
def reference(tiny_dir, prompts):
    return hf_greedy(tiny_dir, prompts, 30)


def test_the_window_changes_transformers_output(tiny_dir, prompts, reference):
    # a meaningful test: the same weights without the window generate something else
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    config.sliding_window = None
    config.layer_types = None if not hasattr(config, "layer_types") else ["full_attention"] * config.num_hidden_layers
    full = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        outputs = [full.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False)[0, len(p):].tolist()
                   for p in prompts]
    assert sum(a != b for a, b in zip(outputs, reference, strict=True)) >= 4


@pytest.mark.parametrize("backend", ["kernel", "gather", "varlen"])
def test_engine_greedy_matches_transformers_through_every_decode_backend(tiny_dir, prompts, reference, backend):
    engine = make_engine(tiny_dir)
    if backend == "kernel" and engine.runner.decode_backend != "kernel":
        pytest.skip("no C++ toolchain to build the native kernel")
    engine.runner.decode_backend, engine.runner.decode_flash = backend, False
    assert run_staggered(engine, prompts, SamplingParams(max_new_tokens=30), first_batch=3) == reference


def test_engine_chunked_prefill_and_prefix_hits_match_transformers(tiny_dir, prompts, reference):
    # chunks of 16 / 24 tokens: each later chunk reads its window from the cached prefix
    shared = [prompts[0][:40] + p for p in prompts[1:4]]
    expected = hf_greedy(tiny_dir, shared, 12)
    for budget in (16, 24):
        engine = make_engine(tiny_dir, max_batch_prefill_tokens=budget)
        assert run_staggered(engine, prompts, SamplingParams(max_new_tokens=30), first_batch=2) == reference
        hits = engine.kv_cache.prefix_cache_hits
        assert run_staggered(engine, shared, SamplingParams(max_new_tokens=12), first_batch=1) == expected
        assert engine.kv_cache.prefix_cache_hits > hits


def test_blocks_behind_the_window_return_to_the_pool_during_a_long_generation(tiny_dir, prompts):
    # Mistral slides in every layer, so blocks behind the window are freed; Qwen2's first layer is full,
    # so every block stays. Greedy ids equal transformers either way, also when a second round reuses
    # freed (still cached) blocks through the prefix cache.
    max_new = 120
    expected = hf_greedy(tiny_dir, prompts, max_new)
    engine = make_engine(tiny_dir)
    windowed = engine.runner.kv_sliding_window is not None
    assert windowed == (transformers.AutoConfig.from_pretrained(tiny_dir).model_type == "mistral")
    kv = engine.kv_cache
    for round_ in range(2):
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=max_new)) for p in prompts]
        tokens, most_used, freed, window_hits = {}, 0, False, False
        hits = kv.prefix_cache_hits
        while engine.has_unfinished:
            for output in engine.step()[0]:
                tokens.setdefault(output.request_id, []).extend(t.id for t in output.new_tokens)
            running = engine.scheduler.running
            freed |= any(kv.null_block in r.block_ids for r in running)
            # right after its prompt's step a request has freed nothing: null entries there are prefix hits
            # that needed only the blocks their window reads
            window_hits |= any(kv.null_block in r.block_ids for r in running if r.num_output_tokens == 1)
            if all(r.num_output_tokens >= 2 for r in running):  # every request past its prompt's step
                most_used = max(most_used, kv.num_used_blocks)
                if windowed:  # the blocks of its last window and the next token: at most 3 blocks of 16
                    assert all(sum(b != kv.null_block for b in r.block_ids) <= 3 for r in running)
        assert [tokens[i] for i in ids] == expected
        longest = max(len(p) for p in prompts) + max_new
        assert freed == windowed
        if windowed:
            assert most_used <= 3 * len(prompts) < -(-longest // 16) * len(prompts)
        assert window_hits == (windowed and round_ == 1)
        if round_ == 1:
            assert kv.prefix_cache_hits > hits
        assert kv.num_used_blocks == 0


@pytest.mark.parametrize("setting", ["small pool", "speculate", "padded graphs"])
def test_freed_blocks_let_a_small_pool_serve_long_contexts_with_drafts_and_graphs(tiny_dir, prompts, setting):
    # 20 blocks of 16: every context (up to 78 + 120 tokens) would need 13 at full attention, 78 in all
    if transformers.AutoConfig.from_pretrained(tiny_dir).model_type != "mistral":
        pytest.skip("blocks are freed only where every layer slides")
    max_new = 120
    expected = hf_greedy(tiny_dir, prompts, max_new)
    settings = {"small pool": dict(max_total_tokens=320, max_input_tokens=200, max_batch_total_tokens=320),
                "speculate": dict(speculate=3), "padded graphs": {}}[setting]
    engine = make_engine(tiny_dir, **settings)
    if setting == "padded graphs":  # the CUDA-graph path (static buffers, padding in the scratch block), eager
        engine.runner.enable_decode_graphs([1, 2, 4, 8], capture=False)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=max_new)) for p in prompts]
    tokens, num_drafts = {}, 0
    while engine.has_unfinished:
        outputs, stats = engine.step()
        num_drafts += sum(stats.num_drafts)
        for output in outputs:
            tokens.setdefault(output.request_id, []).extend(t.id for t in output.new_tokens)
    assert [tokens[i] for i in ids] == expected
    if setting == "small pool":
        assert engine.kv_cache.num_blocks == 20 and engine.scheduler.num_preemptions == 0
    if setting == "speculate":
        assert num_drafts > 0  # drafts were verified (and some rejected and rolled back) beside freed blocks
    if setting == "padded graphs":
        assert engine.runner.graphs is not None
    assert engine.kv_cache.num_used_blocks == 0


def generate_concurrently(url: str, prompts_ids: list[list[int]], tok, max_new: int) -> list[list[int]]:
    def one(ids: list[int]) -> list[int]:
        body = {"inputs": tok.decode(ids), "parameters": {"max_new_tokens": max_new, "details": True}}
        response = httpx.post(url + "/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["details"]["tokens"]]

    with ThreadPoolExecutor(len(prompts_ids)) as pool:
        return list(pool.map(one, prompts_ids))


@pytest.mark.parametrize("num_shard", [1, 2])
def test_six_prompts_over_http_match_transformers_natively(tiny_dir, num_shard, tmp_path):
    from http_server import start_server

    # the server's own tokenizer (transformers may load the folder's as its model type's class), over the
    # decoded text of each prompt, as the server will see it
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts_ids = [tok.encode(tok.decode(tok.encode(t))) for t in TEXTS]
    expected = hf_greedy(tiny_dir, prompts_ids, 30)
    server = start_server(tmp_path, "--model-id", str(tiny_dir), "--num-shard", str(num_shard),
                          "--max-total-tokens", "512", "--max-batch-prefill-tokens", "64")
    try:
        info = httpx.get(server.base_url + "/info", timeout=10).json()
        assert info.get("model_path_kind", "native") == "native"
        assert "transformers fallback" not in server.log()
        assert "sliding window: [16]" in server.log()
        assert generate_concurrently(server.base_url, prompts_ids, tok, 30) == expected
    finally:
        server.stop()


def save_scored_model(path, tokenizer_dir, family: str):
    """Tiny Gemma 2 (soft-capped scores, sliding and global layers) or BLOOM (ALiBi) with head_dim 64, so the
    native kernel's soft-capping and ALiBi run inside a real model."""
    torch.manual_seed(0)
    common = dict(vocab_size=49152, initializer_range=0.3, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    if family == "gemma2":
        config = transformers.Gemma2Config(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=64, max_position_embeddings=512, sliding_window=WINDOW, query_pre_attn_scalar=64,
            attn_logit_softcapping=5.0, final_logit_softcapping=30.0, **common)
    else:
        config = transformers.BloomConfig(hidden_size=128, n_layer=2, n_head=2, **common)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["gemma2", "bloom"])
def test_soft_capping_and_alibi_through_the_native_kernel_match_transformers(family, tmp_path, smollm2_dir, prompts):
    from genserve.server.models import get_model_class

    if get_model_class([{"gemma2": "Gemma2ForCausalLM", "bloom": "BloomForCausalLM"}[family]]) is None:
        pytest.skip(f"no native {family} model")
    path = save_scored_model(tmp_path / family, smollm2_dir, family)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        expected = [model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False)[0, len(p):].tolist()
                    for p in prompts]
    engine = make_engine(path)
    runner = engine.runner
    layers = runner.attention_layers
    assert all(layer.has_score_mods for layer in layers)
    if family == "gemma2":
        assert [layer.sliding_window for layer in layers] == [WINDOW, None]
    backends = ["gather", "varlen"] + (["kernel"] if runner.decode_backend == "kernel" else [])
    for backend in backends:
        runner.decode_backend, runner.decode_flash = backend, False
        assert run_staggered(engine, prompts, SamplingParams(max_new_tokens=20), first_batch=3) == expected, backend
