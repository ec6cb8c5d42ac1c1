"""Write a model folder for `--load-format dummy`: a named shape's config.json plus a tokenizer, no weights.

    .venv/bin/python benchmarks/make_dummy_model.py llama3-8b /tmp/dummy-llama3-8b
    genserve serve --model-id /tmp/dummy-llama3-8b --load-format dummy

The tokenizer (default: the built-in SmolLM2's) is copied as is; its ids all fit the shape's vocabulary
(the shape's `vocab_size` must be >= the tokenizer's), so the embedding and LM head keep the real size.
`--set num_hidden_layers=4` (repeatable, JSON values) shrinks a shape, e.g. to fit a CPU box.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
         "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02}
SHAPES = {
    "llama3-8b": {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
                  "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "llama3-70b": {**LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
                   "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    # SmolLM2's vocabulary, a few MiB of weights: for tests
    "tiny": {**LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
             "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "*.model", "*.jinja",
                   "generation_config.json")


def default_tokenizer_dir() -> Path:
    from genserve.server.model_files import prepare_default_model

    return prepare_default_model()


def tokenizer_size(tokenizer_dir: Path) -> int | None:
    file = tokenizer_dir / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    ids = [*data["model"]["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))] \
        if isinstance(data["model"].get("vocab"), dict) else []
    return max(ids) + 1 if ids else None


def write_dummy_model(target: Path, shape: str, tokenizer_dir: Path, overrides: dict | None = None) -> Path:
    """Write `target/config.json` for `shape` (+ overrides) and copy the tokenizer files next to it."""
    config = {**SHAPES[shape], **(overrides or {})}
    size = tokenizer_size(tokenizer_dir)
    if size is not None and config["vocab_size"] < size:
        raise ValueError(f"vocab_size {config['vocab_size']} is smaller than the tokenizer's {size} tokens")
    source = tokenizer_dir / "config.json"
    if source.is_file():  # the special ids belong to the tokenizer, not to the shape
        ids = json.loads(source.read_text())
        config.update({k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids})
    target.mkdir(parents=True, exist_ok=True)
    for pattern in TOKENIZER_FILES:
        for file in tokenizer_dir.glob(pattern):
            shutil.copy(file, target / file.name)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("target", type=Path)
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="default: the built-in SmolLM2 folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config key")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    print(write_dummy_model(args.target, args.shape, args.tokenizer_dir or default_tokenizer_dir(), overrides))


if __name__ == "__main__":
    main()
