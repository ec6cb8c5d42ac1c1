"""A multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration: text_config + vision_config) serves its text
path natively. Logits at tp=1 and tp=2 are checked with the other families (`gemma3-multimodal` in
family_configs); here: the config the engine reads, both tensor layouts transformers has saved (vision tensors never
read), and over HTTP 6 prompts at once, longer than the sliding window, equal the conditional-generation model's
own text-only generate() in float32, while a chat request with an image is a 422; --use-transformers-fallback
serves it too."""

from __future__ import annotations

import httpx
import torch
import transformers
from family_configs import WINDOW, save_family
from http_server import start_server
from model_helpers import load_native, torch_threads
from safetensors.torch import load_file, save_file
from test_model_families_http import MAX_POSITIONS, PROMPTS, generate_at_once, reference, save_served_model

from genserve.server.models import get_model_class, native_config
from genserve.server.models.gemma3 import Gemma3ForConditionalGeneration

NAME = "gemma3-multimodal"


def test_the_engine_reads_the_text_config(tmp_path):
    hf = save_family(tmp_path, NAME)
    outer = transformers.AutoConfig.from_pretrained(tmp_path)
    text = native_config(outer)
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration" and not hasattr(outer, "num_hidden_layers")
    assert (text.num_hidden_layers, text.vocab_size, text.sliding_window) == (3, 96, WINDOW)
    assert text.architectures == ["Gemma3ForConditionalGeneration"] and text.tie_word_embeddings
    assert get_model_class(text.architectures) is Gemma3ForConditionalGeneration


def test_both_checkpoint_layouts_load_the_text_weights_and_skip_the_vision_tower(tmp_path):
    """transformers 5 (and < 4.52) save `language_model.model.*`; 4.52-4.57 saved `model.language_model.*`,
    `model.vision_tower.*` and the (tied) `lm_head.weight` at the top."""
    hf = save_family(tmp_path / "v5", NAME)
    tensors = load_file(tmp_path / "v5" / "model.safetensors")
    assert any(name.startswith("vision_tower.") for name in tensors)
    older = {name.replace("language_model.model.", "model.language_model.").replace("vision_tower.", "model.vision_tower.")
             .replace("multi_modal_projector.", "model.multi_modal_projector."): t for name, t in tensors.items()}
    older["lm_head.weight"] = older["model.language_model.embed_tokens.weight"].clone()
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    save_file(older, tmp_path / "older" / "model.safetensors")
    with torch_threads(1):
        ours, from_older = load_native(tmp_path / "v5"), load_native(tmp_path / "older")
    assert not any("vision" in name or "multi_modal" in name for name, _ in ours.named_parameters())
    for (name, a), (_, b) in zip(ours.named_parameters(), from_older.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    embed = ours.model.embed_tokens.weight
    assert torch.equal(embed, hf.model.language_model.embed_tokens.weight) and ours.lm_head.weight is embed


def test_the_fallback_serves_it_too(tmp_path, smollm2_dir):
    """--use-transformers-fallback runs Gemma3ForConditionalGeneration itself; the engine's limits and vocabulary
    come from its text config."""
    from genserve.server.config import EngineConfig
    from genserve.server.engine import LLMEngine
    from genserve.server.sampling_params import SamplingParams

    hf = save_family(tmp_path, NAME)
    transformers.AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path)
    prompts = [list(range(3, 40)), [60, 61, 62]]
    with torch_threads(1):
        engine = LLMEngine(EngineConfig(model_id=str(tmp_path), dtype="float32", device="cpu", num_threads=1,
                                        max_batch_total_tokens=2048, use_transformers_fallback=True))
        assert engine.model_path_kind == "transformers" and engine.config.max_total_tokens == 128
        got = engine.generate(prompts, SamplingParams(max_new_tokens=4))
        with torch.no_grad():
            expected = [hf.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False, eos_token_id=2,
                                    pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert got == expected


def test_text_prompts_at_once_over_http_equal_transformers_and_images_are_refused(tmp_path, smollm2_dir):
    hf = save_served_model(tmp_path / "model", NAME, smollm2_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    prompts_ids = [tokenizer(p).input_ids for p in PROMPTS]
    assert sum(len(ids) > WINDOW for ids in prompts_ids) >= 5
    expected = reference(hf, prompts_ids)  # Gemma3ForConditionalGeneration.generate on text alone
    server = start_server(tmp_path, "--model-id", str(tmp_path / "model"), "--max-total-tokens", str(MAX_POSITIONS),
                          "--max-input-tokens", "128")
    try:
        assert httpx.get(server.base_url + "/info", timeout=10).json()["model_path_kind"] == "native"
        assert "transformers fallback" not in server.log()
        assert generate_at_once(server.base_url) == expected
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}],
                "max_tokens": 4}
        refused = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 422, refused.text
        assert "`image_url` is not supported" in refused.json()["error"]
        body["messages"][0]["content"] = [{"type": "text", "text": "What is this?"}]
        answered = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
        assert answered.status_code == 200, answered.text
    finally:
        assert server.stop() == 0, server.log()[-3000:]
