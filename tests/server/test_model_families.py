"""Every native family against transformers (float32) on a tiny random checkpoint of its own config: logits of
batched prefill, chunked prefill over a cached prefix and batched decode, and greedy ids token for token."""

from __future__ import annotations

import pytest
import torch
from family_configs import TINY, family_configs, save_family
from model_helpers import build_metadata, load_native, run_model, torch_threads

from genserve.server.models import MODEL_REGISTRY, get_model_class

FAMILIES = list(family_configs())
NUM_NEW = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_family(path, request.param)
    return hf, load_native(path)


def metadata(decode_contexts: list[list[int]] = (), prefill_contexts: list[tuple[list[int], int]] = ()):
    meta = build_metadata(decode_contexts, prefill_contexts)
    if decode_contexts:  # windows on the gathered contexts are cut from their lengths
        meta.decode_context_lens = torch.tensor([len(ctx) for ctx in decode_contexts])
    return meta


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_family_is_served_by_a_registered_native_class(family):
    hf, model = family
    arch = hf.config.architectures[0]
    assert get_model_class([arch]) is MODEL_REGISTRY[arch] is type(model)
    assert type(model).__module__.startswith("genserve.server.models.")


def test_prefill_chunked_prefill_and_decode_match_transformers(family):
    hf, model = family
    a, b, c = [5, 9, 14, 2, 77, 31, 8, 60, 61, 3, 44, 17], [40, 41, 42], list(range(50, 90))
    slots_a, slots_b, slots_c = list(range(0, 12)), list(range(20, 23)), list(range(30, 70))
    # step 1: prefill a and b, and the first 25 tokens of c
    meta = metadata(prefill_contexts=[(slots_a, 12), (slots_b, 3), (slots_c[:25], 25)])
    logits = run_model(model, a + b + c[:25], list(range(12)) + list(range(3)) + list(range(25)), meta)
    torch.testing.assert_close(logits[:12], hf_logits(hf, a), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[12:15], hf_logits(hf, b), atol=1e-4, rtol=1e-4)
    # step 2: decode a and b, and c's remaining 15 tokens on top of its cached prefix
    a_next, b_next = 11, 64
    slots_a.append(12)
    slots_b.append(23)
    meta = metadata(decode_contexts=[slots_a, slots_b], prefill_contexts=[(slots_c, 15)])
    logits = run_model(model, [a_next, b_next] + c[25:], [12, 3] + list(range(25, 40)), meta)
    torch.testing.assert_close(logits[0], hf_logits(hf, a + [a_next])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], hf_logits(hf, b + [b_next])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[2:], hf_logits(hf, c)[25:], atol=1e-4, rtol=1e-4)


def test_batched_greedy_decode_equals_transformers_token_for_token(family):
    hf, model = family
    prompts = [[7, 3, 19, 25, 88, 4, 4, 12, 60, 33, 71, 5, 9, 30, 2, 14, 80, 21],
               [45, 46, 47], list(range(10, 50)), [93]]
    stride = 64  # sequence i owns slots [i * stride, (i + 1) * stride)
    contexts = [list(range(i * stride, i * stride + len(p))) for i, p in enumerate(prompts)]
    meta = metadata(prefill_contexts=[(ctx, len(ctx)) for ctx in contexts])
    ends = (torch.tensor([len(p) for p in prompts]).cumsum(0) - 1).tolist()
    logits = run_model(model, sum(prompts, []), sum((list(range(len(p))) for p in prompts), []), meta,
                       logit_rows=ends)
    generated = [[t] for t in logits.argmax(-1).tolist()]
    for _ in range(NUM_NEW - 1):
        for ctx in contexts:
            ctx.append(ctx[-1] + 1)
        positions = [len(p) + len(g) - 1 for p, g in zip(prompts, generated, strict=True)]
        logits = run_model(model, [g[-1] for g in generated], positions, metadata(decode_contexts=contexts))
        for g, token in zip(generated, logits.argmax(-1).tolist(), strict=True):
            g.append(token)
    for p, g in zip(prompts, generated, strict=True):
        # greedy is argmax at every step, so one teacher-forced transformers pass checks all of it
        assert hf_logits(hf, p + g[:-1])[len(p) - 1:].argmax(-1).tolist() == g


def test_longrope_caches_the_short_and_the_long_factors_at_every_position():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from genserve.server.layers.rotary import RotaryEmbedding

    config_name, overrides = family_configs()["phi4-mini-partial"]
    config = getattr(transformers, config_name)(**{**TINY, **overrides})
    original = config.rope_parameters["original_max_position_embeddings"]
    rotary = RotaryEmbedding(config, 16, dtype=torch.float32)
    short, scaling = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=original + 1)
    assert rotary.rotary_dim == 8 and scaling > 1.0
    positions = torch.arange(128)
    for inv_freq, rows in ((short, positions), (long, positions + 128)):  # the long set's rows follow the short's
        angles = positions.float()[:, None] * inv_freq
        expected = torch.cat([angles.cos(), angles.sin()], dim=-1) * scaling
        torch.testing.assert_close(rotary.cos_sin_cache[rows], expected)


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_hub_checkpoints_without_the_body_prefix_and_with_mask_buffers_load(tmp_path, name):
    """GPT-2 and BLOOM files on the Hub were saved from the bare body: no `transformer.` prefix, and GPT-2's
    carry the causal-mask buffers `attn.bias` / `attn.masked_bias`."""
    from safetensors.torch import load_file, save_file

    hf = save_family(tmp_path, name)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    if name == "gpt2":
        tensors["h.0.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
        tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors")
    model = load_native(tmp_path)
    ids = [5, 9, 14, 2, 77, 31, 8, 60, 61, 3, 44, 17]
    logits = run_model(model, ids, list(range(len(ids))), metadata(prefill_contexts=[(list(range(12)), 12)]))
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "phi3-longrope", "gpt-neox-sequential"])
def test_bfloat16_close_to_transformers_bfloat16(tmp_path, name):
    hf = save_family(tmp_path, name)
    model = load_native(tmp_path, dtype=torch.bfloat16)
    ids = list(range(1, 30))
    logits = run_model(model, ids, list(range(len(ids))), metadata(prefill_contexts=[(list(range(29)), 29)]))
    torch.testing.assert_close(logits, hf_logits(hf.to(torch.bfloat16), ids), atol=3e-2, rtol=3e-2)
