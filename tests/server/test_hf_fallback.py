"""The transformers fallback for architectures without a native implementation."""

from __future__ import annotations

import pytest
import torch
import transformers
from model_helpers import torch_threads

from genserve.server.models import get_model_class
from genserve.server.models.hf_fallback import TransformersCausalLM


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def test_incremental_greedy_equals_generate(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    assert get_model_class(hf.config.architectures) is None
    runner = TransformersCausalLM(tmp_path, dtype=torch.float32)
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    pasts, generated = [None, None], [[], []]
    new_tokens = [list(p) for p in prompts]
    for _ in range(6):  # interleave two requests, each with its own cache
        for i in range(2):
            logits, pasts[i] = runner.forward_request(new_tokens[i], pasts[i])
            assert logits.shape == (64,) and logits.dtype == torch.float32
            generated[i].append(int(logits.argmax()))
            new_tokens[i] = [generated[i][-1]]
    for prompt, tokens in zip(prompts, generated, strict=True):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist()
