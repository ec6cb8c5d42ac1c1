"""Multi-LoRA serving over real HTTP on SmolLM2 (issue 14): adapters made here with peft (random weights,
ranks 8 and 16, different target modules) give, through TGI's `adapter_id` and OpenAI's `model`, the greedy
tokens of transformers with the adapter merged; a batch of three adapters and the base gives each request
those same tokens; /v1/models, /info and /metrics list the adapters; runtime load/unload (vLLM's routes);
bad adapters are one-line errors."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from http_server import start_server
from lora_helpers import eos_ids, load_base, make_adapters, merged_greedy
from model_helpers import save_tiny_llama, torch_threads
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.lora_adapters import check_adapter, load_registry, parse_lora_adapters
from genserve.server.model_files import DEFAULT_MODEL_ID

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_NEW = 8
NAMES = [None, "sql", "chat", "code"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory, smollm2_dir):
    """The adapters, their merged references, and the server (started while the references compute)."""
    tmp = tmp_path_factory.mktemp("lora")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    eos = eos_ids(smollm2_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    with torch_threads(2), ThreadPoolExecutor(1) as pool:
        base = load_base(smollm2_dir)
        folders = make_adapters(base, tmp)
        spec = ",".join(f"{name}={folder}" for name, folder in folders.items())
        starting = pool.submit(start_server, tmp_path_factory.mktemp("lora-logs"), "--lora-adapters", spec,
                               "--max-loras", "3", "--enable-lora-runtime-updates", ready_timeout=600)
        try:
            # one prompt per adapter: PROMPTS[i % 2] for NAMES[i]
            expected = {name: merged_greedy(base, folders.get(name), [prompts[i % 2]], MAX_NEW, eos)[0]
                        for i, name in enumerate(NAMES)}
        finally:
            server = starting.result()
        changed = merged_greedy(base, None, [prompts[1]], MAX_NEW, eos)[0]
    # each adapter's tokens differ from the base's on the same prompt (else the test proves nothing)
    assert expected["chat"] != expected[None] and changed not in (expected["sql"], expected["code"])
    yield dict(tmp=tmp, folders=folders, expected=expected, tokenizer=tokenizer, hf_config=base.config,
               server=server)
    server.stop()


@pytest.fixture(scope="module")
def server(lora):
    return lora["server"]


def generate(server, prompt: str, adapter_id: str | None) -> list[int]:
    parameters = {"max_new_tokens": MAX_NEW, "details": True}
    if adapter_id is not None:
        parameters["adapter_id"] = adapter_id
    r = httpx.post(server.base_url + "/generate", json={"inputs": prompt, "parameters": parameters}, timeout=300)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_each_adapter_alone_equals_transformers_with_it_merged(server, lora):
    for i, name in enumerate(NAMES):
        assert generate(server, PROMPTS[i % 2], name) == lora["expected"][name], name
    # the base model by its own name, and OpenAI's `model` naming an adapter
    assert generate(server, PROMPTS[0], DEFAULT_MODEL_ID) == lora["expected"][None]
    r = httpx.post(server.base_url + "/v1/completions", timeout=300,
                   json={"model": "chat", "prompt": PROMPTS[NAMES.index("chat") % 2], "max_tokens": MAX_NEW, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "chat"  # the answer names the adapter that served it, as vLLM's does
    assert r.json()["choices"][0]["text"] == lora["tokenizer"].decode(lora["expected"]["chat"],
                                                                      skip_special_tokens=True)


def test_three_adapters_and_the_base_in_one_batch_each_get_their_own_tokens(server, lora):
    jobs = [name for _ in range(2) for name in NAMES]  # each twice: eight requests in flight at once
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda name: generate(server, PROMPTS[NAMES.index(name) % 2], name), jobs))
    for name, got in zip(jobs, results, strict=True):
        assert got == lora["expected"][name], name
    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    for name in NAMES[1:]:
        assert f'genserve_lora_generation_tokens_total{{adapter="{name}"}}' in metrics
    assert 'vllm:lora_requests_info{max_lora="3"' in metrics


def test_models_and_info_list_the_adapters(server, lora):
    cards = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]
    assert [c["id"] for c in cards] == [DEFAULT_MODEL_ID, "sql", "chat", "code"]
    assert cards[1]["parent"] == DEFAULT_MODEL_ID and cards[1]["root"] == str(lora["folders"]["sql"])
    assert httpx.get(server.base_url + "/info", timeout=30).json()["lora_adapters"] == ["sql", "chat", "code"]


def test_unknown_adapter_id_is_a_422(server):
    r = httpx.post(server.base_url + "/generate", timeout=60,
                   json={"inputs": "Hi", "parameters": {"adapter_id": "nope", "max_new_tokens": 2}})
    assert r.status_code == 422
    assert r.json() == {"error": f"Adapter 'nope' is not loaded (adapters: sql, chat, code; the base model is "
                                 f"'{DEFAULT_MODEL_ID}')", "error_type": "validation"}


def test_runtime_load_and_unload(server, lora):
    url = server.base_url
    broken = lora["tmp"] / "broken"
    shutil.copytree(lora["folders"]["sql"], broken)
    (broken / "adapter_model.safetensors").unlink()
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(broken)}, timeout=60)
    assert r.status_code == 422 and "adapter_model.safetensors is missing" in r.json()["error"], r.text
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x"}, timeout=60).status_code == 400
    body = {"lora_name": "code2", "lora_path": str(lora["folders"]["code"])}
    assert httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60).status_code == 200
    assert httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60).status_code == 400  # already loaded
    assert generate(server, PROMPTS[1], "code2") == lora["expected"]["code"]
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "code2"}, timeout=60)
    assert r.status_code == 200
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "code2"}, timeout=60).status_code == 404
    r = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "code2"}}, timeout=60)
    assert r.status_code == 422
    assert generate(server, PROMPTS[1], "sql") == lora["expected"]["sql"]  # nothing else disturbed


def _one_line_error(fn, fragment: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and fragment in message, message
    return message


def test_bad_adapters_are_one_line_errors(lora, tmp_path, smollm2_dir):
    cfg, folders = lora["hf_config"], lora["folders"]

    def check(path, max_rank=64):
        return lambda: check_adapter("bad", Path(path), cfg, DEFAULT_MODEL_ID, max_rank)

    missing = tmp_path / "missing"
    shutil.copytree(folders["sql"], missing)
    (missing / "adapter_config.json").unlink()
    _one_line_error(check(missing), "adapter_config.json is missing")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folders["sql"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    _one_line_error(check(corrupt), "is not a readable safetensors file")
    bad_json = tmp_path / "bad-json"
    shutil.copytree(folders["sql"], bad_json)
    (bad_json / "adapter_config.json").write_text("{")
    _one_line_error(check(bad_json), "is not valid JSON")
    _one_line_error(check(folders["chat"], max_rank=8), "has rank 16, above --max-lora-rank 8")
    head = tmp_path / "lm-head"
    shutil.copytree(folders["sql"], head)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, cfg.hidden_size),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(cfg.vocab_size, 8)},
              str(head / "adapter_model.safetensors"))
    _one_line_error(check(head), "adapts 'lm_head', which the served model does not have as a LoRA target")
    renamed = tmp_path / "renamed"
    shutil.copytree(folders["sql"], renamed)
    tensors = load_file(str(renamed / "adapter_model.safetensors"))
    save_file({k.replace("v_proj", "w_proj"): v for k, v in tensors.items()}, str(renamed / "adapter_model.safetensors"))
    _one_line_error(check(renamed), "target module 'w_proj' is not in the served model")
    # an adapter trained on another (smaller) Llama: its shapes do not fit SmolLM2
    tiny_dir = save_tiny_llama(tmp_path / "tiny", smollm2_dir, num_kv_heads=1)
    with torch_threads(2):
        other = make_adapters(load_base(tiny_dir), tmp_path / "other", {"x": dict(r=8, target_modules=["q_proj"])})
    message = _one_line_error(check(other["x"]), "the adapter was trained on another base model")
    assert str(tiny_dir) in message
    _one_line_error(lambda: parse_lora_adapters("a=/x,a=/y"), "names adapter 'a' twice")
    _one_line_error(lambda: load_registry(f"gone={tmp_path / 'gone'}", cfg, DEFAULT_MODEL_ID, 4, 64), "does not exist")


def test_a_bad_adapter_stops_the_engine_before_any_weight_loads(lora, smollm2_dir, monkeypatch):
    """The engine refuses at start (the CLI prints a start-up ValueError as one line), the runner never built."""
    from genserve.server import model_runner

    def no_runner(*args, **kwargs):
        raise AssertionError("weights loaded before the adapters were checked")

    monkeypatch.setattr(model_runner, "ModelRunner", no_runner)
    config = EngineConfig(model_id=str(smollm2_dir), dtype="float32", max_total_tokens=256,
                          lora_adapters=f"hi={lora['folders']['chat']}", max_lora_rank=8)
    _one_line_error(lambda: LLMEngine(config), "LoRA adapter 'hi' has rank 16, above --max-lora-rank 8")
