"""LoRA adapters in the spec (issue 14, operator side): parsing and the CRD agree; the operator's fetch step
runs for real against a Hub-shaped server, then `genserve serve` runs with the operator's own args and serves
the adapters by name; the real operator against the emulator passes the adapters to the server's flags and
the init step, rolls the Deployment when the list changes, reports what the real server has loaded, and turns
a bad list into Degraded once (no retries)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from crd_schema import CelRuleError, validate
from harness import add_ready_pod, condition, get_tgs, tgs_status, wait_for
from harness import create_tgs as create
from hub_server import HubServer
from kubernetes import client
from test_init_step import BIN, container_env

from genserve.operator.adapter_status import NO_POD, loaded_adapters
from genserve.operator.cache_volumes import fill_job_name
from genserve.operator.reconcile import build_children
from genserve.operator.settings import OperatorSettings
from genserve.operator.spec import SpecError, parse_spec

GROUP, VERSION, PLURAL = "genserve.dev", "v1alpha1", "textgenerationservices"
DEPLOY, JOB = "apps/v1/deployments", "batch/v1/jobs"
MODEL = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}
ADAPTERS = [{"name": "sql", "source": "org/sql-lora"},
            {"name": "chat.v2", "source": "hf://org/chat-lora@v2"},
            {"name": "legal", "source": "s3://loras/legal", "s3": {"endpoint": "http://minio:9000",
                                                                   "credentialsSecretRef": {"name": "minio"}}},
            {"name": "local", "source": "pvc://lora-store/teams/local"}]
SETTINGS = OperatorSettings()


def pod_of(spec: dict, cache_filled: bool = True) -> tuple[dict | None, list[dict]]:
    wanted, _ = build_children("svc", "ns", parse_spec(spec, "img"), SETTINGS, 1, cache_filled=cache_filled)
    deployment = next((o for o in wanted if o["kind"] == "Deployment"), None)
    return deployment and deployment["spec"]["template"]["spec"], wanted


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ---- the spec and the manifests, pure --------------------------------------------------------------

def test_adapters_reach_the_server_flags_the_fetch_step_and_read_only_claims():
    pod, wanted = pod_of({"model": MODEL, "shards": 0, "adapters": ADAPTERS, "maxLoras": 2})
    kubernetes_validate.validate(wanted[0], "1.29.0", strict=True)
    server = pod["containers"][0]
    assert flag(server["args"], "--lora-adapters") == ("sql=/data/adapters/sql,chat.v2=/data/adapters/chat.v2,"
                                                       "legal=/data/adapters/legal,"
                                                       "local=/adapter-sources/lora-store/teams/local")
    assert flag(server["args"], "--max-loras") == "2"
    init = {c["name"]: c for c in pod["initContainers"]}
    assert list(init) == ["download", "adapters", "adapters-1"]  # one container per set of store keys
    assert init["adapters"]["args"] == ["--into", "/data/adapters", "sql=hf://org/sql-lora@main",
                                        "chat.v2=hf://org/chat-lora@v2"]
    assert init["adapters-1"]["args"] == ["--into", "/data/adapters", "legal=s3://loras/legal"]
    s3_env = {e["name"]: e for e in init["adapters-1"]["env"]}
    assert s3_env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000"
    assert s3_env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "minio", "key": "AWS_ACCESS_KEY_ID"}
    assert "AWS_ENDPOINT_URL_S3" not in {e["name"] for e in init["adapters"]["env"]}
    assert {"name": "adapter-source-0", "persistentVolumeClaim": {"claimName": "lora-store", "readOnly": True}} \
        in pod["volumes"]
    assert {"name": "adapter-source-0", "mountPath": "/adapter-sources/lora-store", "readOnly": True} \
        in server["volumeMounts"]


def test_without_adapters_nothing_changes():
    pod, _ = pod_of({"model": MODEL, "shards": 0})
    assert "--lora-adapters" not in pod["containers"][0]["args"]
    assert [c["name"] for c in pod["initContainers"]] == ["download"]
    spec = parse_spec({"model": MODEL, "cache": {"mode": "shared"}}, "img")
    assert fill_job_name("svc", spec) == fill_job_name("svc", parse_spec(
        {"model": MODEL, "cache": {"mode": "shared"}, "adapters": []}, "img"))


def test_s3_adapters_use_the_models_store_and_pvc_adapters_share_its_claim():
    store = {"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "minio"}}
    pod, _ = pod_of({"shards": 0, "model": {"source": "s3://models/base", "s3": store},
                     "adapters": [{"name": "a", "source": "s3://models/loras/a"}]})
    fetch = next(c for c in pod["initContainers"] if c["name"] == "adapters")
    assert {e["name"]: e.get("value") for e in fetch["env"]}["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    # a pvc:// model: adapters on its claim are read where the model is, no second volume, no fetch step
    pod, _ = pod_of({"shards": 0, "model": {"source": "pvc://weights/base"},
                     "adapters": [{"name": "b", "source": "pvc://weights/loras/b"}]})
    assert flag(pod["containers"][0]["args"], "--lora-adapters") == "b=/model-source/loras/b"
    assert "initContainers" not in pod and not any(v["name"].startswith("adapter-source") for v in pod["volumes"])


def test_shared_cache_fill_job_fetches_the_adapters_and_a_new_list_is_a_new_job():
    spec = {"model": MODEL, "shards": 0, "cache": {"mode": "shared"}, "adapters": ADAPTERS[:1]}
    _, wanted = pod_of(spec, cache_filled=False)
    job = next(o for o in wanted if o["kind"] == "Job")
    kubernetes_validate.validate(job, "1.29.0", strict=True)
    assert [c["name"] for c in job["spec"]["template"]["spec"]["containers"]] == ["download", "adapters"]
    assert fill_job_name("svc", parse_spec(spec, "img")) != fill_job_name(
        "svc", parse_spec({**spec, "adapters": ADAPTERS[:2]}, "img"))
    # a pvc:// model needs no download, its Hub adapters still do: the Job holds only their step
    pvc_model = {**spec, "model": {"source": "pvc://weights/base"}}
    _, wanted = pod_of(pvc_model, cache_filled=False)
    job = next(o for o in wanted if o["kind"] == "Job")
    assert [c["name"] for c in job["spec"]["template"]["spec"]["containers"]] == ["adapters"]
    pod, _ = pod_of(pvc_model)
    assert "initContainers" not in pod  # the Job fetched them into the read-only claim


BAD = [
    ([{"name": "a", "source": "org/a"}, {"name": "a", "source": "org/b"}], "DuplicateAdapterName", None),
    ([{"name": "../x", "source": "org/a"}], "InvalidAdapterName", "does not match"),
    ([{"name": "x", "source": "pvc://claim/../x"}], "InvalidAdapterSource", "'.' or '..' path segments"),
    ([{"name": "x", "source": "hf://org/../x"}], "InvalidAdapterSource", "'.' or '..' path segments"),
    ([{"name": "x", "source": "gs://bucket/x"}], "UnsupportedAdapterSource", "must be org/name, hf://"),
    ([{"name": "x", "source": "org/x", "s3": {"region": "eu"}}], "InvalidAdapterSource", "only for s3://"),
    ([{"name": "x", "source": "s3://bucket"}], "InvalidAdapterSource", None),
    ([{"name": "x", "source": "pvc://claim/a,b"}], "InvalidAdapterSource", None),
]


@pytest.mark.parametrize(("adapters", "reason", "crd_message"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_adapter_lists_are_refused_by_the_operator_and_the_crd(adapters, reason, crd_message):
    with pytest.raises(SpecError) as err:
        parse_spec({"model": MODEL, "adapters": adapters}, "img")
    assert err.value.reason == reason
    if crd_message is None:
        return  # uniqueness is the API server's list-map keys; s3://bucket and a ',' are the operator's checks
    pytest.importorskip("celpy", reason="cel-python evaluates the CRD's x-kubernetes-validations")
    body = {"apiVersion": "genserve.dev/v1alpha1", "kind": "TextGenerationService", "metadata": {"name": "x"},
            "spec": {"model": MODEL, "adapters": adapters}}
    with pytest.raises((jsonschema.ValidationError, CelRuleError), match=crd_message):
        validate(body)


def test_crd_accepts_the_good_list_and_max_loras():
    body = {"apiVersion": "genserve.dev/v1alpha1", "kind": "TextGenerationService", "metadata": {"name": "x"},
            "spec": {"model": MODEL, "adapters": ADAPTERS, "maxLoras": 2}}
    spec = parse_spec(validate(body)["spec"], "img")
    assert [a.name for a in spec.adapters] == ["sql", "chat.v2", "legal", "local"] and spec.max_loras == 2
    with pytest.raises(jsonschema.ValidationError, match="less than the minimum"):
        validate({**body, "spec": {**body["spec"], "maxLoras": 0}})


# ---- the fetch step and the server, run for real ---------------------------------------------------

TINY = {"vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}


def write_lora(folder: Path, seed: int) -> Path:
    """A LoRA folder in PEFT's layout for the tiny Llama (rank 8 on q_proj and v_proj, random weights), written
    with safetensors directly: importing peft costs ~15 s here."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    out = {"q_proj": TINY["hidden_size"], "v_proj": TINY["num_key_value_heads"] * head_dim}
    prefix = "base_model.model.model.layers.0.self_attn"
    folder.mkdir(parents=True)
    save_file({**{f"{prefix}.{m}.lora_A.weight": rng.standard_normal((8, TINY["hidden_size"])).astype(np.float32)
                  for m in out},
               **{f"{prefix}.{m}.lora_B.weight": rng.standard_normal((n, 8)).astype(np.float32) for m, n in out.items()}},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": list(out),
        "base_model_name_or_path": "tiny"}))
    (folder / "README.md").write_text("not fetched")
    return folder


def run_step(container: dict, root: Path, extra: dict[str, str]) -> subprocess.CompletedProcess:
    args = [str(root / a.lstrip("/")) if a.startswith("/data") else a for a in container["args"]]
    return subprocess.run([str(BIN / container["command"][0]), *container["command"][1:], *args],
                          env=container_env(container, root, extra), capture_output=True, text=True, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    root: Path
    source: Path  # what the Hub served
    pod: dict  # the pod spec the operator built
    downloads: list[int]  # Hub downloads after the first and the second (restarted) fetch
    port: int


SERVED_SPEC = {"model": {"source": "pvc://models/tiny"}, "shards": 0, "maxLoras": 2,
               "adapters": [{"name": "sql", "source": "org/sql-lora@v1"},
                            {"name": "extra", "source": "pvc://models/loras/extra"}],
               "server": {"extraArgs": ["--hostname", "127.0.0.1", "--num-threads", "1", "--device", "cpu",
                                        "--dtype", "float32", "--max-total-tokens", "256",
                                        "--max-batch-total-tokens", "4096"]}}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    """The operator's pod for a pvc:// tiny Llama with a Hub adapter and one on the model's claim: its fetch
    step runs against a Hub-shaped server, then `genserve serve` runs with the server container's own args
    and environment (/data and /model-source mapped to a temporary root)."""
    import torch
    import transformers

    from genserve.server.model_files import prepare_default_model

    root = tmp_path_factory.mktemp("pod")
    model = root / "model-source" / "tiny"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(prepare_default_model() / name, model / name)
    write_lora(root / "model-source" / "loras" / "extra", seed=1)
    source = write_lora(tmp_path_factory.mktemp("hub") / "sql", seed=0)
    pod, _ = pod_of(SERVED_SPEC)
    assert [c["name"] for c in pod.get("initContainers", [])] == ["adapters"]  # a pvc:// model: no download
    hub = HubServer("org/sql-lora", "v1", source)
    try:
        downloads = []
        for _ in range(2):  # the second run is a restarted pod's
            result = run_step(pod["initContainers"][0], root, {"HF_ENDPOINT": hub.url})
            assert result.returncode == 0, result.stderr[-3000:]
            downloads.append(len(hub.downloads()))
    finally:
        hub.stop()
    server = pod["containers"][0]
    port = free_port()
    # the pod's mount points, also inside --lora-adapters' name=path list
    args = [re.sub(r"(^|[=,])(?=/data/|/model-source/)", lambda m: m.group(1) + str(root), a) for a in server["args"]]
    args = [*args[:args.index("--port") + 1], str(port), *args[args.index("--port") + 2:]]
    log = (root / "serve.log").open("w")
    # the PyTorch paths: a native-kernel build (minutes on a busy machine after any kernel edit) is not the point
    env = container_env(server, root, {"GENSERVE_CPU_KERNELS": "0", "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen([str(BIN / server["command"][0]), *args], env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"genserve serve exited: {(root / 'serve.log').read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False
    try:
        wait_for(healthy, timeout=240, interval=0.5, what="genserve serve /health")
        yield Served(root, source, pod, downloads, port)
    finally:
        proc.kill()  # its drain on SIGTERM is tested elsewhere; here it only costs seconds
        proc.wait(30)
        log.close()


def test_fetch_step_downloads_the_adapter_once_and_links_it_where_the_server_looks(served):
    args = served.pod["containers"][0]["args"]
    assert flag(args, "--lora-adapters") == "sql=/data/adapters/sql,extra=/model-source/loras/extra"
    linked = served.root / "data" / "adapters" / "sql"
    assert linked.is_symlink() and linked.resolve().is_relative_to(served.root / "data" / "hub")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (linked / name).read_bytes() == (served.source / name).read_bytes()
    first, second = served.downloads
    assert first == 2 and second == first  # config and weights (no README), and a restart found the cache


def test_the_server_takes_the_operators_flags_and_serves_the_adapters_by_name(served):
    url = f"http://127.0.0.1:{served.port}"
    pod = {"spec": {"containers": [{"ports": [{"name": "http", "containerPort": served.port}]}]},
           "status": {"podIP": "127.0.0.1"}}
    assert loaded_adapters(pod, timeout=10) == {"sql", "extra"}

    def generate(adapter_id: str) -> int:  # TGI's route: an unknown adapter_id is a 422, never the base
        body = json.dumps({"inputs": "Hello", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 2}})
        request = urllib.request.Request(url + "/generate", body.encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                assert "generated_text" in json.loads(response.read())
                return response.status
        except urllib.error.HTTPError as e:
            return e.code
    assert generate("sql") == 200 and generate("extra") == 200
    assert generate("support") == 422  # a name the pod was not given


def test_fetch_step_fails_in_one_line_on_a_folder_that_is_no_adapter(tmp_path):
    not_adapter = tmp_path / "plain"
    not_adapter.mkdir()
    (not_adapter / "config.json").write_text("{}")
    hub = HubServer("org/plain", "main", not_adapter)
    try:
        pod, _ = pod_of({"model": MODEL, "shards": 0, "adapters": [{"name": "p", "source": "org/plain"}]})
        fetch = next(c for c in pod["initContainers"] if c["name"] == "adapters")
        result = run_step(fetch, tmp_path / "root", {"HF_ENDPOINT": hub.url})
    finally:
        hub.stop()
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("adapter p: ")
    assert "adapter_config.json" in result.stderr and not (tmp_path / "root" / "data" / "adapters" / "p").exists()


def test_fetch_step_imports_nothing_the_server_image_lacks():
    probe = ("import sys, genserve.operator.adapter_fetch; "
             "print(sorted(m for m in ('kopf', 'kubernetes', 'prometheus_client') if m in sys.modules))")
    result = subprocess.run([str(BIN / "python"), "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# ---- the real operator against the emulator ---------------------------------------------------------

def validate_stored(obj):
    stored = {k: v for k, v in obj.items() if k != "status"}
    stored["metadata"] = {k: obj["metadata"][k] for k in ("name", "namespace", "labels")}
    kubernetes_validate.validate(stored, "1.29.0", strict=True)
    return obj


def server_of(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_operator_passes_adapters_rolls_on_change_and_reports_what_is_loaded(operator, api, cluster, namespace,
                                                                              served):
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "minio"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}})
    core.create_namespaced_persistent_volume_claim(namespace, {"metadata": {"name": "lora-store"}, "spec": {
        "accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    create(api, namespace, "chat", {"model": MODEL, "shards": 0, "adapters": ADAPTERS, "maxLoras": 2})
    deployment = validate_stored(wait_for(lambda: cluster.get(DEPLOY, namespace, "chat"), what="the Deployment"))
    args = server_of(deployment)["args"]
    assert flag(args, "--lora-adapters").startswith("sql=/data/adapters/sql,chat.v2=/data/adapters/chat.v2,")
    assert flag(args, "--max-loras") == "2"
    init = {c["name"]: c["args"] for c in deployment["spec"]["template"]["spec"]["initContainers"]}
    assert init["adapters"][2:] == ["sql=hf://org/sql-lora@main", "chat.v2=hf://org/chat-lora@v2"]
    status = wait_for(lambda: (s := tgs_status(api, namespace)).get("adapters") and s, what="status.adapters")
    assert status["adaptersReadFrom"] == NO_POD
    assert {a["loaded"] for a in status["adapters"]} == {"Unknown"}

    # a changed list is a changed pod template: the Deployment rolls its pods
    old = deployment["spec"]["template"]
    new_list = ADAPTERS[:1] + [{"name": "support", "source": "org/support-lora"}]
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "chat", {"spec": {"adapters": new_list}})
    rolled = wait_for(lambda: (d := cluster.get(DEPLOY, namespace, "chat")) and "support=" in flag(
        server_of(d)["args"], "--lora-adapters") and d, what="the Deployment with the new adapters")
    validate_stored(rolled)
    assert rolled["spec"]["template"] != old
    assert flag(server_of(rolled)["args"], "--lora-adapters") == "sql=/data/adapters/sql,support=/data/adapters/support"
    init = {c["name"]: c["args"] for c in rolled["spec"]["template"]["spec"]["initContainers"]}
    assert list(init) == ["download", "adapters"] and init["adapters"][2:] == ["sql=hf://org/sql-lora@main",
                                                                              "support=hf://org/support-lora@main"]
    assert not any(v["name"].startswith("adapter-source") for v in rolled["spec"]["template"]["spec"]["volumes"])

    # a ready pod answers (the real server of `served`, with sql and extra): what it loaded, and one loaded
    # beyond this spec's list
    add_ready_pod(api, namespace, "chat", "chat-0", served.port)
    client.AppsV1Api(api).patch_namespaced_deployment_status(
        "chat", namespace, {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}})
    status = wait_for(lambda: (s := tgs_status(api, namespace)).get("adaptersReadFrom") == "pod chat-0" and s,
                      what="status.adapters read from the pod")
    assert status["adapters"] == [{"name": "sql", "loaded": "True"}, {"name": "support", "loaded": "False"},
                                  {"name": "extra", "loaded": "True"}]


@pytest.mark.parametrize(("adapters", "reason"), [
    ([{"name": "a", "source": "org/a"}, {"name": "a", "source": "org/b"}], "DuplicateAdapterName"),
    ([{"name": "../x", "source": "org/a"}], "InvalidAdapterName"),
    ([{"name": "x", "source": "gs://bucket/x"}], "UnsupportedAdapterSource"),
], ids=["duplicate", "traversal", "scheme"])
def test_a_bad_adapter_list_is_degraded_once_with_its_reason(operator, api, cluster, namespace, adapters, reason):
    create(api, namespace, "bad", {"model": MODEL, "shards": 0, "adapters": adapters})
    degraded = wait_for(lambda: (c := condition(get_tgs(api, namespace, "bad"), "Degraded")) and c["status"] == "True"
                        and c, what="Degraded")
    assert degraded["reason"] == reason and "spec.adapters" in degraded["message"]

    def handled():  # kopf stores the handled spec only when no retry is pending (a permanent error)
        annotations = get_tgs(api, namespace, "bad")["metadata"].get("annotations") or {}
        return "genserve.dev/last-handled-configuration" in annotations
    wait_for(handled, what="the spec handled")
    warnings = wait_for(lambda: [e for e in cluster.list("v1/events", namespace) if e.get("reason") == reason],
                        what=f"a Warning event {reason}")
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning" and cluster.get(DEPLOY, namespace, "bad") is None
