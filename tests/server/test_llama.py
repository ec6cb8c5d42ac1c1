"""Our Llama-family model against transformers on tiny random checkpoints and on SmolLM2-135M."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from model_helpers import CONFIGS, build_metadata, load_native, make_tiny_checkpoint, run_model, torch_threads

from genserve.server.layers.rotary import compute_inv_freq
from genserve.server.models import get_model_class
from genserve.server.models.llama import LlamaForCausalLM


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_checkpoint(path, *CONFIGS[request.param])
    return hf, load_native(path)


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_registry_maps_architectures():
    assert get_model_class(["MistralForCausalLM"]) is LlamaForCausalLM
    assert get_model_class(["Qwen2ForCausalLM"]) is LlamaForCausalLM
    assert get_model_class(["GPTJForCausalLM"]) is None


def test_rope_reads_legacy_rope_theta_and_rope_scaling():
    legacy = SimpleNamespace(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0},
                             max_position_embeddings=64)
    current = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                              max_position_embeddings=64)
    scaled, _ = compute_inv_freq(legacy, 16)
    default, _ = compute_inv_freq(current, 16)
    torch.testing.assert_close(scaled, default / 4.0)
    with pytest.raises(ValueError, match="longrope"):
        compute_inv_freq(SimpleNamespace(rope_parameters={"rope_type": "longrope"}, max_position_embeddings=64), 16)


def test_prefill_two_sequences_matches_transformers(tiny):
    hf, model = tiny
    a, b = list(range(3, 20)), [7, 1, 90, 45, 45, 2, 33, 12, 60]
    meta = build_metadata(prefill_contexts=[(list(range(len(a))), len(a)),
                                            (list(range(len(a), len(a) + len(b))), len(b))])
    logits = run_model(model, a + b, list(range(len(a))) + list(range(len(b))), meta)
    torch.testing.assert_close(logits[:len(a)], hf_logits(hf, a), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[len(a):], hf_logits(hf, b), atol=1e-4, rtol=1e-4)


def test_decode_and_chunked_prefill_match_transformers(tiny):
    hf, model = tiny
    a, b, c = [5, 9, 14, 2, 77, 31, 8], [40, 41, 42], list(range(50, 90))
    # step 1: prefill a and b, plus the first 25 tokens of c
    slots_a, slots_b, slots_c = list(range(0, 7)), list(range(10, 13)), list(range(20, 60))
    meta = build_metadata(prefill_contexts=[(slots_a, 7), (slots_b, 3), (slots_c[:25], 25)])
    run_model(model, a + b + c[:25], list(range(7)) + list(range(3)) + list(range(25)), meta)
    # step 2: decode a and b, and c's remaining 15 tokens on top of its cached prefix
    a_next, b_next = 11, 64
    slots_a.append(7)
    slots_b.append(13)
    meta = build_metadata(decode_contexts=[slots_a, slots_b], prefill_contexts=[(slots_c, 15)])
    logits = run_model(model, [a_next, b_next] + c[25:], [7, 3] + list(range(25, 40)), meta)
    torch.testing.assert_close(logits[0], hf_logits(hf, a + [a_next])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], hf_logits(hf, b + [b_next])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[2:], hf_logits(hf, c)[25:], atol=1e-4, rtol=1e-4)


def test_bfloat16_close_to_transformers(tmp_path):
    hf = make_tiny_checkpoint(tmp_path, *CONFIGS["llama-gqa"])
    model = load_native(tmp_path, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.attn.k_cache.dtype == torch.bfloat16
    ids = list(range(1, 30))
    meta = build_metadata(prefill_contexts=[(list(range(len(ids))), len(ids))])
    logits = run_model(model, ids, list(range(len(ids))), meta)
    reference = hf_logits(hf.to(torch.bfloat16), ids)
    torch.testing.assert_close(logits, reference, atol=2e-2, rtol=2e-2)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a small dragon who",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tokenizer, hf, load_native(smollm2_dir, num_slots=512)


@pytest.mark.slow
def test_smollm2_prefill_logits_match_transformers(smollm2):
    tokenizer, hf, model = smollm2
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    contexts, ids, positions, start = [], [], [], 0
    for p in prompts:
        contexts.append((list(range(start, start + len(p))), len(p)))
        ids += p
        positions += list(range(len(p)))
        start += len(p)
    logits = run_model(model, ids, positions, build_metadata(prefill_contexts=contexts))
    offset = 0
    for p in prompts:
        reference = hf_logits(hf, p)
        torch.testing.assert_close(logits[offset:offset + len(p)], reference, atol=1e-3, rtol=1e-3)
        assert torch.equal(logits[offset:offset + len(p)].argmax(-1), reference.argmax(-1))
        offset += len(p)


@pytest.mark.slow
def test_smollm2_batched_greedy_decode_matches_transformers(smollm2):
    tokenizer, hf, model = smollm2
    num_new, stride = 8, 128  # sequence i owns slots [i * stride, (i + 1) * stride)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    contexts = [list(range(i * stride, i * stride + len(p))) for i, p in enumerate(prompts)]
    meta = build_metadata(prefill_contexts=[(ctx, len(ctx)) for ctx in contexts])
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    logits = run_model(model, sum(prompts, []), sum((list(range(len(p))) for p in prompts), []), meta,
                       logit_rows=ends.tolist())
    generated = [[t] for t in logits.argmax(-1).tolist()]
    for _ in range(num_new - 1):
        for ctx in contexts:
            ctx.append(ctx[-1] + 1)
        meta = build_metadata(decode_contexts=contexts)
        positions = [len(p) + len(g) - 1 for p, g in zip(prompts, generated, strict=True)]
        logits = run_model(model, [g[-1] for g in generated], positions, meta)
        for g, token in zip(generated, logits.argmax(-1).tolist(), strict=True):
            g.append(token)
    for p, g in zip(prompts, generated, strict=True):
        # greedy is argmax at every step, so one teacher-forced transformers pass checks all of it
        reference = hf_logits(hf, p + g[:-1])[len(p) - 1:]
        assert reference.argmax(-1).tolist() == g
