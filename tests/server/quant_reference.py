"""Acceptance helpers for quantized weights: a float checkpoint holding given (dequantized) weights, and
greedy token ids from transformers (float32) and from genserve's engine over the same prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
NEW_TOKENS = 12
VOCAB_WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear_weight(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR_NAMES


def float_checkpoint(source: Path, target: Path, weights: dict[str, torch.Tensor] | None = None,
                     transform=None, vocab_transform=None) -> Path:
    """Copy `source`'s config and tokenizer to `target` and write its tensors (replaced by `weights`, or each
    linear weight by `transform(name, weight)` and the embedding / LM head by `vocab_transform(weight)`) as one
    float32 safetensors file."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith((".safetensors", ".gguf")) and "index" not in file.name:
            shutil.copy(file, target / file.name)
    if weights is None:
        weights = {}
        for file in sorted(source.glob("*.safetensors")):
            weights.update(load_file(str(file)))
        if transform is not None:
            weights = {name: transform(name, w) if is_linear_weight(name) else w for name, w in weights.items()}
        if vocab_transform is not None:
            weights = {name: vocab_transform(w) if name in VOCAB_WEIGHTS else w for name, w in weights.items()}
    save_file({name: w.float().contiguous() for name, w in weights.items()}, str(target / "model.safetensors"))
    return target


def tokenize(model_dir: Path) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [tok.encode(p) for p in PROMPTS]


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():  # argmax by hand: generate() would stop at EOS, the engine runs ignore_eos
        for ids in prompts:
            seq = list(ids)
            for _ in range(new_tokens):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            outputs.append(seq[len(ids):])
    return outputs


def engine_greedy(model_id: str, prompts: list[list[int]], new_tokens: int = NEW_TOKENS, **settings):
    settings.setdefault("dtype", "float32")
    engine = LLMEngine(EngineConfig(model_id=str(model_id), max_batch_total_tokens=4096, max_total_tokens=512,
                                    **settings))
    return engine, engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
