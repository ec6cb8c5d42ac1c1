"""New native families over real HTTP: 6 prompts sent at once to `genserve serve`, longer than the sliding
windows, greedy ids equal transformers float32 token for token; Gemma 2 at --num-shard 2."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import transformers
from family_configs import WINDOW, save_family
from http_server import start_server
from model_helpers import torch_threads

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time, in a land far away, there lived a small dragon who loved",
    "1, 2, 3, 4, 5, 6, 7, 8, 9,",
    "Translate to German: the weather is nice today and we are going for a walk",
    "Q: What is the boiling point of water at sea level? A:",
]
MAX_NEW = 8
MAX_POSITIONS = 256
SERVED = {  # family -> --num-shard
    "gemma2": 2,
    "phi3-longrope": 1,
    "bloom": 1,
}


def save_served_model(path, name: str, tokenizer_dir) -> torch.nn.Module:
    """SmolLM2's tokenizer and vocabulary; large initial weights so greedy picks are not near-ties."""
    extra = dict(vocab_size=49152, initializer_range=0.2, eos_token_id=2, bos_token_id=1,
                 max_position_embeddings=MAX_POSITIONS)
    if name.startswith("gpt2"):
        extra["n_positions"] = MAX_POSITIONS
    if name.startswith("gemma"):
        extra["head_dim"] = 64  # a head size the native CPU decode kernel takes
    hf = save_family(path, name, **extra)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return hf


def reference(hf, prompts_ids: list[list[int]]) -> list[list[int]]:
    with torch_threads(1), torch.no_grad():
        return [hf.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2,
                            pad_token_id=0)[0, len(ids):].tolist() for ids in prompts_ids]


def generate_at_once(url: str) -> list[list[int]]:
    def one(prompt: str) -> list[int]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
        response = httpx.post(url + "/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["details"]["tokens"]]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


@pytest.mark.parametrize("name", list(SERVED))
def test_six_prompts_at_once_over_http_equal_transformers(tmp_path, smollm2_dir, name):
    hf = save_served_model(tmp_path / "model", name, smollm2_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    prompts_ids = [tokenizer(p).input_ids for p in PROMPTS]
    if getattr(hf.config, "sliding_window", None):
        assert sum(len(ids) > WINDOW for ids in prompts_ids) >= 5
    expected = reference(hf, prompts_ids)
    server = start_server(tmp_path, "--model-id", str(tmp_path / "model"), "--num-shard", str(SERVED[name]),
                          "--max-total-tokens", str(MAX_POSITIONS), "--max-input-tokens", "128")
    try:
        info = httpx.get(server.base_url + "/info", timeout=10).json()
        assert info.get("model_path_kind", "native") == "native"
        assert "transformers fallback" not in server.log()
        if name.startswith("gemma"):
            assert "decode attention: kernel" in server.log() or "decode attention: gather" in server.log()
        assert generate_at_once(server.base_url) == expected
    finally:
        assert server.stop() == 0, server.log()[-3000:]
