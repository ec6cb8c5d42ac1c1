"""LoRA adapters of a service (`spec.adapters`), parsed and checked once, like the model's own source.

  org/name or hf://org/name[@revision]   the Hub: fetched into the cache by the init step (or fill Job)
  s3://bucket/prefix                     an S3-compatible store: fetched the same way (store settings in
                                         the adapter's `s3`, else the model's when it comes from S3 too)
  pvc://claim[/path]                     a claim that already holds the adapter, mounted read-only
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from genserve.operator.model_source import (
    SCHEMES,
    ModelSpec,
    PvcSource,
    S3Spec,
    SecretKeyRef,
    SourceError,
    _s3,
)

MAX_ADAPTERS = 128
# a path component and an OpenAI model name: no '/', no '..', no ',' or '=' (the server flag's separators)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(slots=True)
class AdapterSpec:
    name: str
    source: str  # normalized: hf://org/name@revision, s3://bucket/prefix or pvc://claim/path
    scheme: str
    s3: S3Spec | None = None
    pvc: PvcSource | None = None

    @property
    def needs_download(self) -> bool:
        return self.scheme != "pvc"


def _has_traversal(path: str) -> bool:
    return any(part in (".", "..") for part in re.split(r"[/@]", path))


def parse_adapter(raw: Any, index: int, model: ModelSpec) -> AdapterSpec:
    where = f"spec.adapters[{index}]"
    if not isinstance(raw, dict):
        raise SourceError("InvalidAdapterSource", f"{where} must be an object with name and source")
    name, source = raw.get("name"), raw.get("source")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise SourceError("InvalidAdapterName",
                          f"{where}.name {name!r} must be 1-63 letters, digits, '.', '_' or '-', starting and "
                          "ending with a letter or digit")
    where = f"spec.adapters[{index}] ({name})"
    if not isinstance(source, str) or not source.strip():
        raise SourceError("InvalidAdapterSource", f"{where}: source is required")
    scheme, sep, rest = source.partition("://")
    if not sep:
        scheme, rest = "hf", source  # a bare Hub id
    if scheme not in SCHEMES:
        raise SourceError("UnsupportedAdapterSource",
                          f"{where}: source scheme {scheme!r} is not supported; use org/name, hf://, s3:// or pvc://")
    if not rest.strip("/") or _has_traversal(rest):
        raise SourceError("InvalidAdapterSource", f"{where}: source {source!r} names no adapter or holds '.'/'..'")
    if scheme != "s3" and raw.get("s3"):
        raise SourceError("InvalidAdapterSource", f"{where}: s3 is only for s3:// sources")
    if scheme == "hf":
        repo, at, revision = rest.partition("@")
        if not HUB_REPO.match(repo) or (at and not revision):
            raise SourceError("InvalidAdapterSource", f"{where}: Hub source {source!r} must be org/name[@revision]")
        return AdapterSpec(name, f"hf://{repo}@{revision or 'main'}", "hf")
    if scheme == "s3":
        store = raw.get("s3")
        s3 = _s3(rest, store, f"{where}.s3") if store else _s3(rest, {})
        if not store and model.s3:  # the model's store, keys and all
            s3.endpoint, s3.region = model.s3.endpoint, model.s3.region
            s3.access_key_id, s3.secret_access_key = model.s3.access_key_id, model.s3.secret_access_key
        if not s3.bucket or not s3.prefix:
            raise SourceError("InvalidAdapterSource", f"{where}: s3:// source {source!r} must be s3://bucket/prefix")
        return AdapterSpec(name, f"s3://{s3.bucket}/{s3.prefix}", "s3", s3=s3)
    claim, _, path = rest.partition("/")
    if not CLAIM.match(claim) or "," in path:  # the path goes into the server's comma-separated flag
        raise SourceError("InvalidAdapterSource", f"{where}: pvc:// source {source!r} must be pvc://claim[/path] "
                          "with no ',' in the path")
    pvc = PvcSource(claim=claim, path=path.strip("/"))
    return AdapterSpec(name, f"pvc://{claim}/{pvc.path}".rstrip("/"), "pvc", pvc=pvc)


def parse_adapters(raw: Any, model: ModelSpec) -> list[AdapterSpec]:
    """`spec.adapters`; raises SourceError with the reason for the Degraded condition."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SourceError("InvalidAdapterSource", "spec.adapters must be a list of {name, source}")
    if len(raw) > MAX_ADAPTERS:
        raise SourceError("InvalidAdapterSource", f"spec.adapters holds {len(raw)} adapters; at most {MAX_ADAPTERS}")
    adapters = [parse_adapter(item, i, model) for i, item in enumerate(raw)]
    seen: set[str] = set()
    for adapter in adapters:
        if adapter.name in seen:
            raise SourceError("DuplicateAdapterName", f"spec.adapters: the name {adapter.name!r} is used twice")
        seen.add(adapter.name)
    return adapters


def secret_refs(adapters: list[AdapterSpec]) -> list[tuple[str, SecretKeyRef]]:
    refs = []
    for adapter in adapters:
        if adapter.s3:
            for ref in (adapter.s3.access_key_id, adapter.s3.secret_access_key):
                if ref is not None:
                    refs.append((f"spec.adapters ({adapter.name}) s3.credentialsSecretRef", ref))
    return refs
