"""`--load-format dummy`: random weights from a folder holding only config.json and a tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from http_server import start_server
from model_helpers import attach_kv_cache, build_metadata, run_model
from transformers import AutoConfig

from genserve.server import cli
from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.loader import init_dummy_weights, load_weights
from genserve.server.models import get_model_class
from genserve.server.models.hf_fallback import TransformersCausalLM
from genserve.server.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from make_dummy_model import SHAPES, write_dummy_model  # noqa: E402

ENGINE = dict(dtype="float32", device="cpu", max_batch_total_tokens=4096, max_total_tokens=512)


@pytest.fixture(scope="module")
def dummy_dir(tmp_path_factory, smollm2_dir):
    return write_dummy_model(tmp_path_factory.mktemp("dummy"), "tiny", smollm2_dir)


def native_model(model_dir):
    config = AutoConfig.from_pretrained(model_dir)
    return get_model_class(config.architectures)(config, dtype=torch.float32)


def test_folder_holds_only_config_and_tokenizer(dummy_dir):
    assert not list(dummy_dir.glob("*.safetensors"))
    assert {"config.json", "tokenizer.json"} <= {p.name for p in dummy_dir.iterdir()}


def test_dummy_weights_are_small_seeded_and_norms_are_ones(dummy_dir):
    model, again = native_model(dummy_dir), native_model(dummy_dir)
    load_weights(model, dummy_dir, "dummy")
    init_dummy_weights(again)
    for (name, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name
        if "norm" in name:
            assert torch.all(p == 1), name
        else:
            assert p.abs().max() <= 1e-3 and p.std() > 1e-4, name
    other = native_model(dummy_dir)
    init_dummy_weights(other, seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_logits_are_finite_and_depend_on_the_input(dummy_dir):
    model = native_model(dummy_dir)
    init_dummy_weights(model)
    attach_kv_cache(model, 64)
    ids = [1, 500, 9000, 42]
    logits = run_model(model, ids, list(range(4)), build_metadata(prefill_contexts=[(list(range(4)), 4)]))
    assert logits.shape == (4, 49152) and torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > 0 and len(set(logits.argmax(-1).tolist())) > 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_generates_the_requested_tokens(dummy_dir, dtype):
    engine = LLMEngine(EngineConfig(model_id=str(dummy_dir), load_format="dummy", **{**ENGINE, "dtype": dtype}))
    prompts = [engine.tokenizer.encode("Hello there"), engine.tokenizer.encode("1, 2, 3")]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [len(o) for o in outputs] == [6, 6]


def test_tensor_parallel_ranks_fill_their_own_shards(dummy_dir):
    engine = LLMEngine(EngineConfig(model_id=str(dummy_dir), load_format="dummy", num_shard=2, **ENGINE))
    try:
        outputs = engine.generate([engine.tokenizer.encode("Hello")] * 2, SamplingParams(max_new_tokens=5,
                                                                                        ignore_eos=True))
    finally:
        engine.shutdown()
    assert [len(o) for o in outputs] == [5, 5] and outputs[0] == outputs[1]


@pytest.mark.parametrize("quantize", ["eetq", "fp8"])
def test_quantization_and_cpu_packing_run_on_dummy_weights(dummy_dir, quantize):
    engine = LLMEngine(EngineConfig(model_id=str(dummy_dir), load_format="dummy", quantize=quantize, **ENGINE))
    outputs = engine.generate([engine.tokenizer.encode("Hi")], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(outputs[0]) == 4


def test_transformers_fallback_inits_from_config(dummy_dir):
    model = TransformersCausalLM(dummy_dir, dtype=torch.float32, load_format="dummy")
    again = TransformersCausalLM(dummy_dir, dtype=torch.float32, load_format="dummy")
    logits, _ = model.forward_request([1, 2, 3], None)
    assert logits.shape == (49152,) and torch.isfinite(logits).all() and logits.std() > 0
    assert torch.equal(logits, again.forward_request([1, 2, 3], None)[0])
    engine = LLMEngine(EngineConfig(model_id=str(dummy_dir), load_format="dummy", use_transformers_fallback=True,
                                    **ENGINE))
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]) == 3


def test_no_weights_without_dummy_is_the_clear_error(dummy_dir):
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files in .*--load-format dummy"):
        LLMEngine(EngineConfig(model_id=str(dummy_dir), **ENGINE))


def test_bad_load_format_is_a_one_line_error(capsys):
    with pytest.raises(ValueError, match="`--load-format` must be one of auto, safetensors, dummy; got 'pt'"):
        EngineConfig(load_format="pt")
    with pytest.raises(SystemExit) as exc:
        cli.serve(cli.build_parser().parse_args(["serve", "--load-format", "pt"]))
    assert str(exc.value) == "genserve serve: error: `--load-format` must be one of auto, safetensors, dummy; got 'pt'"
    proc = subprocess.run([str(Path(sys.executable).parent / "genserve"), "serve"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "LOAD_FORMAT": "npz"})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "genserve serve: error: `--load-format` must be one of auto, safetensors, dummy; got 'npz'"]


def test_shapes_and_vocab_check(tmp_path, smollm2_dir):
    folder = write_dummy_model(tmp_path / "8b", "llama3-8b", smollm2_dir)
    config = AutoConfig.from_pretrained(folder)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (4096, 32, 32, 8, 14336, 128256)
    assert config.eos_token_id == json.loads((smollm2_dir / "config.json").read_text())["eos_token_id"]
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        write_dummy_model(tmp_path / "small", "tiny", smollm2_dir, {"vocab_size": 1000})
    assert set(SHAPES) >= {"llama3-8b", "tiny"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, dummy_dir):
    srv = start_server(tmp_path_factory.mktemp("serve-dummy"), "--model-id", str(dummy_dir), "--load-format", "dummy")
    yield srv
    srv.stop()


def test_every_route_answers_over_http(server, dummy_dir):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        info = c.get("/info").json()
        assert info["load_format"] == "dummy" and info["model_id"] == str(dummy_dir)
        assert info["max_total_tokens"] == 1024 and info["router"] == "genserve"
        assert c.get("/health").status_code == 200

        r = c.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True,
                                                                      "decoder_input_details": True}})
        assert r.status_code == 200, r.text
        details = r.json()["details"]
        assert details["generated_tokens"] == 5 and len(details["tokens"]) == 5
        assert isinstance(r.json()["generated_text"], str)

        with c.stream("POST", "/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True}}) as r:
            assert r.status_code == 200
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        assert len(events) == 4 and events[-1]["details"]["generated_tokens"] == 4

        r = c.post("/v1/chat/completions", json={"model": "tgi", "max_tokens": 6, "ignore_eos": True,
                                                 "messages": [{"role": "user", "content": "Say hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 6 and r.json()["choices"][0]["message"]["role"] == "assistant"

        r = c.post("/v1/completions", json={"model": "tgi", "prompt": ["a", "b"], "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] == 6

        models = c.get("/v1/models").json()
        assert models["object"] == "list" and len(models["data"]) == 1

        r = c.post("/tokenize", json={"inputs": "Hello world"})
        assert r.status_code == 200 and len(r.json()) >= 2

        metrics = server.metrics()
        assert metrics["tgi_request_success"] >= 4
