"""The init step (and the fill Job) as the operator writes it, run for real: the container's command, args
and environment from the built manifest, /data and /tmp mapped to temporary folders, Secrets resolved
from test values. Sources: s3:// against moto's S3-compatible server (boto3), hf:// against a local
Hub-shaped server (huggingface_hub with HF_ENDPOINT). Then the server container's own environment must
find the files without any network."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer

from genserve.operator.reconcile import build_children
from genserve.operator.settings import OperatorSettings
from genserve.operator.spec import parse_spec

SETTINGS = OperatorSettings()
SECRETS = {"minio": {"AWS_ACCESS_KEY_ID": "genserve-test", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"},
           "hf": {"token": "hf_test_token"}}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny Llama with SmolLM2's tokenizer files: small, but a real checkpoint folder."""
    import torch
    import transformers

    from genserve.server.model_files import prepare_default_model

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(prepare_default_model() / name, folder / name)
    return folder


def container_env(container: dict, root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HF_HUB_DISABLE_TELEMETRY": "1"}
    for item in container["env"]:
        if "value" in item:
            value = item["value"]
            for mount in ("/data", "/tmp"):
                if value == mount or value.startswith(mount + "/"):
                    value = str(root / mount.strip("/")) + value[len(mount):]
                    break
            env[item["name"]] = value
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = SECRETS[ref["name"]][ref["key"]]
    return {**env, **(extra or {})}


def run(container: dict, root: Path, extra: dict[str, str] | None = None) -> str:
    command = [str(BIN / container["command"][0]), *container["args"]]
    result = subprocess.run(command, env=container_env(container, root, extra), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def server_resolves(server: dict, root: Path) -> Path:
    """What `genserve serve` does first with --model-id/--revision, in the server container's environment."""
    args = server["args"]
    model_id, revision = args[args.index("--model-id") + 1], args[args.index("--revision") + 1]
    probe = {"command": ["python"], "env": server["env"], "args": [
        "-c", "import sys; from genserve.server.model_files import resolve_model; "
              "print(resolve_model(sys.argv[1], sys.argv[2]))", model_id, revision]}
    return Path(run(probe, root))


def download_step(raw: dict) -> tuple[dict, dict]:
    """(download container, server container) of a built service; the fill Job's container for shared."""
    spec = parse_spec(raw, "genserve:test")
    wanted, _ = build_children("svc", "ns", spec, SETTINGS, 1, cache_filled=False)
    kinds = {o["kind"]: o for o in wanted}
    job = kinds.get("Job")
    wanted, _ = build_children("svc", "ns", spec, SETTINGS, 1, cache_filled=True)
    pod = next(o for o in wanted if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    download = job["spec"]["template"]["spec"]["containers"][0] if job else pod["initContainers"][0]
    return download, pod["containers"][0]


def assert_same_files(source: Path, copy: Path) -> None:
    names = sorted(p.name for p in source.iterdir())
    assert names and all((copy / n).read_bytes() == (source / n).read_bytes() for n in names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server():
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is the local S3-compatible store")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._port}"
    server.stop()


def test_s3_source_through_boto3(tiny_model, s3_server, tmp_path):
    boto3 = pytest.importorskip("boto3")

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id=SECRETS["minio"]["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=SECRETS["minio"]["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="models")
    for path in tiny_model.iterdir():
        s3.upload_file(str(path), "models", f"llama/tiny/{path.name}")
    s3.put_object(Bucket="models", Key="llama/tiny-other/config.json", Body=b"{}")  # a sibling prefix
    download, server = download_step({"shards": 0, "model": {"source": "s3://models/llama/tiny", "s3": {
        "endpoint": s3_server, "region": "us-east-1", "credentialsSecretRef": {"name": "minio"}}}})
    copied = Path(run(download, tmp_path))
    assert copied.is_relative_to(tmp_path / "data" / "models")
    assert_same_files(tiny_model, copied)
    assert not (copied / "tiny-other").exists()
    # a second start finds the complete copy and reads nothing from the store
    assert Path(run(download, tmp_path, {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})) == copied
    assert server_resolves(server, tmp_path) == copied


def test_s3_source_with_wrong_keys_fails_the_step(tiny_model, s3_server, tmp_path):
    download, _ = download_step({"shards": 0, "model": {"source": "s3://no-such-bucket/m", "s3": {
        "endpoint": s3_server, "region": "us-east-1", "credentialsSecretRef": {"name": "minio"}}}})
    command = [str(BIN / download["command"][0]), *download["args"]]
    result = subprocess.run(command, env=container_env(download, tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "NoSuchBucket" in result.stderr


@pytest.mark.parametrize("cache", [{"mode": "perPod", "volume": "emptyDir"},
                                   {"mode": "shared", "accessMode": "ReadWriteMany"}], ids=["perPod", "shared"])
def test_hf_source_through_huggingface_hub(tiny_model, tmp_path, cache):
    hub = HubServer("org/tiny-llama", "v1", tiny_model)
    try:
        download, server = download_step({"shards": 0, "cache": cache, "model": {
            "source": "hf://org/tiny-llama@v1", "tokenSecretRef": {"name": "hf"}}})
        snapshot = Path(run(download, tmp_path, {"HF_ENDPOINT": hub.url}))
        assert snapshot.is_relative_to(tmp_path / "data" / "hub")
        assert_same_files(tiny_model, snapshot)
        assert len(hub.downloads()) == len(hub.files)
    finally:
        hub.stop()
    # the Hub is gone: the server container reads the cache offline (read-only in shared mode)
    assert server_resolves(server, tmp_path) == snapshot
