"""Launcher flags that change the model's config or tokenizer before anything is built from them:
TGI's --rope-scaling / --rope-factor and --tokenizer-config-path."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

ROPE_SCALINGS = ("linear", "dynamic")


def validate_rope_flags(rope_scaling: str | None, rope_factor: float | None) -> None:
    if rope_scaling is not None and rope_scaling not in ROPE_SCALINGS:
        raise ValueError(f"`--rope-scaling` must be one of {', '.join(ROPE_SCALINGS)}; got {rope_scaling!r}")
    if rope_factor is not None and not (math.isfinite(rope_factor) and rope_factor >= 1.0):
        raise ValueError(f"`--rope-factor` must be a number >= 1; got {rope_factor}")
    if rope_scaling == "dynamic":
        # its frequencies depend on each sequence's length, while the rotary cache holds one set for all
        raise ValueError("`--rope-scaling dynamic` is not supported: dynamic NTK recomputes the frequencies per "
                         "sequence length; use `--rope-scaling linear` or a checkpoint with yarn/llama3/longrope")


def apply_rope_flags(hf_config, rope_scaling: str | None, rope_factor: float | None) -> None:
    """TGI's semantics: `--rope-factor F` alone is linear scaling by F; `--rope-scaling linear` alone is a
    factor of 1 (nothing changes). The context the model accepts grows by the factor."""
    validate_rope_flags(rope_scaling, rope_factor)
    if rope_scaling is None and rope_factor is None:
        return
    factor = float(rope_factor or 1.0)
    base = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    existing = base.get("rope_type") or base.get("type") or "default"
    if existing not in ("default", "linear"):
        raise ValueError(f"`--rope-scaling`/`--rope-factor` would replace the checkpoint's own {existing!r} rope "
                         "scaling; leave them unset for this model")
    base.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    base.update(rope_type="linear", factor=factor)
    base.pop("type", None)
    original = hf_config.max_position_embeddings
    if hasattr(hf_config, "rope_parameters"):
        hf_config.rope_parameters = base
    hf_config.rope_scaling = base
    hf_config.max_position_embeddings = int(original * factor)
    logger.info("rope scaling: linear, factor %g; context %d -> %d tokens", factor, original,
                hf_config.max_position_embeddings)


def apply_tokenizer_config(tokenizer, path: str | None) -> None:
    """TGI's --tokenizer-config-path: a tokenizer_config.json whose `chat_template` replaces the model's."""
    if not path:
        return
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"`--tokenizer-config-path`: no file at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"`--tokenizer-config-path` {path} is not a JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"`--tokenizer-config-path` {path} must hold a JSON object")
    template = data.get("chat_template")
    if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise ValueError(f"`--tokenizer-config-path` {path}: chat_template must be a string")
    if template is None:
        raise ValueError(f"`--tokenizer-config-path` {path} has no chat_template")
    tokenizer.chat_template = template
    ignored = sorted(set(data) - {"chat_template"})
    logger.info("chat template from %s%s", path, f" (other keys not applied: {', '.join(ignored)})" if ignored else "")
