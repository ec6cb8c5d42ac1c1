"""LoRA in the engine on a tiny random Llama (1 KV head): at --num-shard 2 (A/B sharded as their base layers,
the KV head replicated) three adapters and the base in one run equal transformers with each adapter merged,
with --max-loras 2 so the third adapter waits for a slot and loads from disk (LRU); prefix caching never
hands one adapter's KV to another."""

from __future__ import annotations

import multiprocessing

import pytest
from lora_helpers import eos_ids, load_base, make_adapters, merged_greedy
from model_helpers import save_tiny_llama, torch_threads
from transformers import AutoTokenizer

from genserve.server import distributed
from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
NAMES = [None, "sql", "chat", "code"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("lora-tiny")
    model_dir = save_tiny_llama(tmp / "model", smollm2_dir, num_kv_heads=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    with torch_threads(2):
        base = load_base(model_dir)
        folders = make_adapters(base, tmp)
        eos = eos_ids(model_dir)
        expected = [merged_greedy(base, folders.get(name), [p], MAX_NEW, eos)[0] for name, p in zip(NAMES, prompts, strict=True)]
        base_tokens = merged_greedy(base, None, prompts[1:], MAX_NEW, eos)
    assert all(b != e for b, e in zip(base_tokens, expected[1:], strict=True)), "an adapter changes nothing"
    return model_dir, folders, prompts, expected


def make_engine(model_dir, folders, **overrides) -> LLMEngine:
    spec = ",".join(f"{name}={folder}" for name, folder in folders.items())
    settings = dict(model_id=str(model_dir), dtype="float32", max_total_tokens=256, max_input_tokens=200,
                    max_batch_total_tokens=4096, lora_adapters=spec)
    return LLMEngine(EngineConfig(**{**settings, **overrides}))


def params(name: str | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_NEW, adapter_id=name)


def test_two_shards_three_adapters_two_resident_equal_transformers_merged(tiny):
    model_dir, folders, prompts, expected = tiny
    engine = make_engine(model_dir, folders, num_shard=2, max_loras=2)
    try:
        assert distributed.get_tp_size() == 2
        assert engine.generate(prompts, [params(n) for n in NAMES]) == expected
        assert len(engine.runner.lora.resident) == 2  # the third adapter evicted the least recently used one
    finally:
        engine.shutdown()
    assert not distributed.is_distributed()
    assert not multiprocessing.active_children()


def test_prefix_cache_is_keyed_by_adapter(tiny):
    model_dir, folders, prompts, expected = tiny
    engine = make_engine(model_dir, folders)
    prompt = prompts[0] * 8  # several full KV blocks
    cached = {}
    for name in ["sql", "chat", "sql", None, None]:
        request_id = engine.add_request(prompt, params(name))
        while engine.has_unfinished:
            for out in engine.step()[0]:
                if out.request_id == request_id and out.finished:
                    cached.setdefault(name, []).append(out.num_cached_tokens)
    # the first run of each adapter (and of the base) finds nothing; the same adapter again finds its own blocks
    assert cached["sql"][0] == 0 and cached["chat"] == [0] and cached[None][0] == 0
    assert cached["sql"][1] > 0 and cached[None][1] > 0
