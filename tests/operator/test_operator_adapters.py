"""LoRA adapters in the spec (issue 14, operator side): parsing and the CRD agree, the fetch step runs for
real against a Hub-shaped server with a PEFT adapter, and the real operator against the emulator passes the
adapters to the server's flags and the init step, rolls the Deployment when the list changes, reports what a
pod has loaded, and turns a bad list into Degraded once (no retries)."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from crd_schema import CelRuleError, validate
from harness import add_ready_pod, tgs_body, tgs_status, wait_for
from hub_server import HubServer
from kubernetes import client
from test_init_step import BIN, container_env

from genserve.operator.adapter_status import NO_POD
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
]


@pytest.mark.parametrize(("adapters", "reason", "crd_message"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_adapter_lists_are_refused_by_the_operator_and_the_crd(adapters, reason, crd_message):
    with pytest.raises(SpecError) as err:
        parse_spec({"model": MODEL, "adapters": adapters}, "img")
    assert err.value.reason == reason
    if crd_message is None:
        return  # uniqueness is the API server's list-map keys; s3://bucket needs the operator's own check
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


# ---- the fetch step, run for real -------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory) -> Path:
    """A LoRA folder in PEFT's layout (config and safetensors weights, random, rank 8 on q/v of one layer);
    written with safetensors directly: the fetch step moves files, and importing peft costs ~15 s."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("adapter")
    rng = np.random.default_rng(0)
    prefix = "base_model.model.model.layers.0.self_attn"
    save_file({f"{prefix}.{proj}.lora_{ab}.weight": rng.standard_normal(shape).astype(np.float32)
               for proj in ("q_proj", "v_proj") for ab, shape in (("A", (8, 32)), ("B", (32, 8)))},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": MODEL["id"]}))
    (folder / "README.md").write_text("not fetched")
    return folder


def run_step(container: dict, root: Path, extra: dict[str, str]) -> subprocess.CompletedProcess:
    args = [str(root / a.lstrip("/")) if a.startswith("/data") else a for a in container["args"]]
    return subprocess.run([str(BIN / container["command"][0]), *container["command"][1:], *args],
                          env=container_env(container, root, extra), capture_output=True, text=True, timeout=300)


def test_fetch_step_downloads_a_peft_adapter_and_links_it_where_the_server_looks(peft_adapter, tmp_path):
    hub = HubServer("org/sql-lora", "v1", peft_adapter)
    try:
        pod, _ = pod_of({"model": MODEL, "shards": 0, "adapters": [{"name": "sql", "source": "org/sql-lora@v1"}]})
        fetch = next(c for c in pod["initContainers"] if c["name"] == "adapters")
        result = run_step(fetch, tmp_path, {"HF_ENDPOINT": hub.url})
        assert result.returncode == 0, result.stderr[-3000:]
        first_downloads = len(hub.downloads())
        assert run_step(fetch, tmp_path, {"HF_ENDPOINT": hub.url}).returncode == 0  # a restarted pod
    finally:
        hub.stop()
    path = flag(pod["containers"][0]["args"], "--lora-adapters").split("=", 1)[1]
    linked = tmp_path / path.lstrip("/")
    assert linked.is_symlink() and linked.resolve().is_relative_to(tmp_path / "data" / "hub")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (linked / name).read_bytes() == (peft_adapter / name).read_bytes()
    assert first_downloads >= 2 and len(hub.downloads()) == first_downloads  # the second run found the cache


def test_fetch_step_fails_in_one_line_on_a_folder_that_is_no_adapter(peft_adapter, tmp_path):
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

def create(api, namespace, name, spec):
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, tgs_body(name, spec))


def get_tgs(api, namespace, name):
    return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def condition(obj, type_):
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def validate_stored(obj):
    stored = {k: v for k, v in obj.items() if k != "status"}
    stored["metadata"] = {k: obj["metadata"][k] for k in ("name", "namespace", "labels")}
    kubernetes_validate.validate(stored, "1.29.0", strict=True)
    return obj


class ModelsEndpoint:
    """A real local HTTP server answering /v1/models as a server with adapters does (vLLM's format)."""

    def __init__(self, base: str, adapters: list[str]):
        self.body = json.dumps({"object": "list", "data": [{"id": base, "object": "model", "parent": None}] + [
            {"id": a, "object": "model", "parent": base, "root": f"/data/adapters/{a}"} for a in adapters]}).encode()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                found = self.path == "/v1/models"
                body = endpoint.body if found else b"{}"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def server_of(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_operator_passes_adapters_rolls_on_change_and_reports_what_is_loaded(operator, api, cluster, namespace):
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

    # a ready pod answers: what it loaded, and one loaded at runtime beyond the spec
    endpoint = ModelsEndpoint(MODEL["id"], ["sql", "runtime-extra"])
    try:
        add_ready_pod(api, namespace, "chat", "chat-0", endpoint.port)
        client.AppsV1Api(api).patch_namespaced_deployment_status(
            "chat", namespace, {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}})
        status = wait_for(lambda: (s := tgs_status(api, namespace)).get("adaptersReadFrom") == "pod chat-0" and s,
                          what="status.adapters read from the pod")
    finally:
        endpoint.stop()
    assert status["adapters"] == [{"name": "sql", "loaded": "True"}, {"name": "support", "loaded": "False"},
                                  {"name": "runtime-extra", "loaded": "True"}]


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

    def handled():  # kopf records the spec as handled: a permanent error, no retry is pending
        annotations = get_tgs(api, namespace, "bad")["metadata"].get("annotations") or {}
        return "genserve.dev/last-handled-configuration" in annotations
    wait_for(handled, what="the spec handled")
    warnings = lambda: [e for e in cluster.list("v1/events", namespace) if e.get("reason") == reason]  # noqa: E731
    wait_for(warnings, what=f"a Warning event {reason}")
    time.sleep(1.0)  # room for a retry that must not come
    assert len(warnings()) == 1 and cluster.get(DEPLOY, namespace, "bad") is None
