"""Where a service's weights come from: `spec.model.id` (a Hub id) or `spec.model.source` with a scheme.

  hf://org/name[@revision]   the Hugging Face Hub (huggingface_hub in the init step; token from a Secret)
  s3://bucket/prefix         an S3-compatible store (boto3 in the init step; endpoint, region, keys from a Secret)
  pvc://claim[/path]         a claim that already holds the files, mounted read-only; nothing is downloaded
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMES = ("hf", "s3", "pvc")
PVC_MOUNT = "/model-source"


class SourceError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(slots=True)
class S3Spec:
    bucket: str
    prefix: str
    endpoint: str | None = None
    region: str | None = None
    access_key_id: SecretKeyRef | None = None
    secret_access_key: SecretKeyRef | None = None


@dataclass(slots=True)
class PvcSource:
    claim: str
    path: str = ""


@dataclass(slots=True)
class ModelSpec:
    id: str  # what the server and the init step get as --model-id
    revision: str = "main"
    token_secret: SecretKeyRef | None = None
    scheme: str = "hf"
    s3: S3Spec | None = None
    pvc: PvcSource | None = None

    @property
    def needs_download(self) -> bool:
        return self.scheme != "pvc"

    def secret_refs(self) -> list[tuple[str, SecretKeyRef]]:
        """(field, ref) of every Secret the pods read, to check before anything is scheduled."""
        refs = [("spec.model.tokenSecretRef", self.token_secret)]
        if self.s3:
            refs += [("spec.model.s3.credentialsSecretRef", self.s3.access_key_id),
                     ("spec.model.s3.credentialsSecretRef", self.s3.secret_access_key)]
        return [(where, ref) for where, ref in refs if ref is not None]


def secret_ref(raw: dict[str, Any] | None, default_key: str, where: str) -> SecretKeyRef | None:
    if not raw:
        return None
    if not raw.get("name"):
        raise SourceError("InvalidSecretRef", f"{where}.name is required")
    return SecretKeyRef(name=raw["name"], key=raw.get("key") or default_key)


def _split(source: str) -> tuple[str, str]:
    scheme, sep, rest = source.partition("://")
    if not sep or not scheme:
        raise SourceError("UnsupportedModelSource",
                          f"spec.model.source {source!r} has no scheme; use hf://, s3:// or pvc://")
    if scheme not in SCHEMES:
        raise SourceError("UnsupportedModelSource",
                          f"spec.model.source scheme {scheme!r} is not supported; use hf://, s3:// or pvc://")
    if not rest.strip("/"):
        raise SourceError("InvalidModelSource", f"spec.model.source {source!r} names no model")
    return scheme, rest


def _s3(rest: str, raw: dict[str, Any], where: str = "spec.model.s3") -> S3Spec:
    bucket, _, prefix = rest.partition("/")
    creds = raw.get("credentialsSecretRef") or {}
    where = f"{where}.credentialsSecretRef"
    if creds and not creds.get("name"):
        raise SourceError("InvalidSecretRef", f"{where}.name is required")
    return S3Spec(
        bucket=bucket, prefix=prefix.strip("/"), endpoint=raw.get("endpoint"), region=raw.get("region"),
        access_key_id=SecretKeyRef(creds["name"], creds.get("accessKeyIdKey") or "AWS_ACCESS_KEY_ID")
        if creds else None,
        secret_access_key=SecretKeyRef(creds["name"], creds.get("secretAccessKeyKey") or "AWS_SECRET_ACCESS_KEY")
        if creds else None)


def parse_model(raw: dict[str, Any]) -> ModelSpec:
    """`spec.model` with either `id` (a Hub id, as before) or `source`; raises SourceError."""
    token = secret_ref(raw.get("tokenSecretRef"), "token", "spec.model.tokenSecretRef")
    source, model_id = raw.get("source"), raw.get("id")
    if not source:
        if not model_id:
            raise SourceError("MissingModel", "spec.model.id or spec.model.source is required")
        return ModelSpec(id=model_id, revision=raw.get("revision") or "main", token_secret=token)
    if model_id:
        raise SourceError("InvalidModelSource", "set spec.model.id or spec.model.source, not both")
    scheme, rest = _split(source)
    if scheme != "s3" and raw.get("s3"):
        raise SourceError("InvalidModelSource", "spec.model.s3 is only for s3:// sources")
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        if repo.count("/") > 1:
            raise SourceError("InvalidModelSource", f"hf:// source {source!r} must be hf://org/name[@revision]")
        return ModelSpec(id=repo, revision=revision or raw.get("revision") or "main", token_secret=token)
    if scheme == "s3":
        s3 = _s3(rest, raw.get("s3") or {})
        if not s3.prefix:
            raise SourceError("InvalidModelSource", f"s3:// source {source!r} must be s3://bucket/prefix")
        return ModelSpec(id=f"s3://{s3.bucket}/{s3.prefix}", revision="main", scheme="s3", s3=s3)
    claim, _, path = rest.partition("/")
    pvc = PvcSource(claim=claim, path=path.strip("/"))
    return ModelSpec(id=f"{PVC_MOUNT}/{pvc.path}".rstrip("/"), scheme="pvc", pvc=pvc)


def source_env(model: ModelSpec) -> list[dict[str, Any]]:
    """Environment the download step needs: credentials only through secretKeyRef, never as values."""
    env: list[dict[str, Any]] = []
    if model.token_secret:
        ref = model.token_secret
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if model.s3:
        env += s3_env(model.s3)
    return env


def s3_env(s3: S3Spec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if s3.endpoint:
        # boto3 reads the endpoint of an S3-compatible store from here (botocore >= 1.31)
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": s3.endpoint})
    if s3.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": s3.region})
    for name, ref in (("AWS_ACCESS_KEY_ID", s3.access_key_id), ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key)):
        if ref:
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env
