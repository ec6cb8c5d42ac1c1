"""The transformers fallback: padded batched forwards over gathered caches, and the one-line start-up errors
(unknown architecture, remote code, corrupted safetensors) through the real `genserve serve` command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from http_server import start_server
from model_helpers import torch_threads

from genserve.server.models import get_model_class
from genserve.server.models.hf_fallback import (
    KVRows,
    TransformersCausalLM,
    check_safetensors_headers,
    gather_rows,
    load_hf_config,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def tiny_gpt2(path):
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(path)
    return hf


def test_rows_with_different_pasts_and_chunks_equal_generate(tmp_path):
    """Two requests interleaved: each step gathers both rows' past into one left-padded batch, new
    tokens right-padded; every greedy token equals transformers' generate of that request alone."""
    hf = tiny_gpt2(tmp_path)
    runner = TransformersCausalLM(tmp_path, dtype=torch.float32)
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    new_tokens = [list(p) for p in prompts]
    past, batch, generated = [0, 0], None, [[], []]
    for _ in range(6):
        sources = [None if p == 0 else (batch, row) for row, p in enumerate(past)]
        cache = gather_rows(sources, past)
        width = cache.get_seq_length()
        logits = runner.forward_batch(new_tokens, cache, past, logits_to_keep=0)
        assert logits.dtype == torch.float32 and logits.shape[:2] == (2, max(map(len, new_tokens)))
        for row in range(2):
            generated[row].append(int(logits[row, len(new_tokens[row]) - 1].argmax()))
        batch = KVRows(cache, ["a", "b"], [p + len(c) for p, c in zip(past, new_tokens, strict=True)],
                       [width + len(c) for c in new_tokens])
        past = batch.lengths
        new_tokens = [[g[-1]] for g in generated]
    for prompt, tokens in zip(prompts, generated, strict=True):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist()


def test_gpt2_is_not_native_here_and_loads_through_transformers(tmp_path):
    hf = tiny_gpt2(tmp_path)
    if get_model_class(hf.config.architectures) is None:
        assert TransformersCausalLM(tmp_path).can_batch


def test_config_errors_are_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch",
                                                      "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ValueError, match=r"unknown architecture \['NoSuchForCausalLM'\] \(model_type 'no-such-arch'\)"
                                         r".*neither native in genserve nor known to transformers"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "custom-thing",
                                                      "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    with pytest.raises(ValueError, match="needs the checkpoint's own code .* pass --trust-remote-code"):
        load_hf_config(tmp_path)
    # a known model_type with an auto_map (Phi-3, Qwen checkpoints) loads without remote code
    config = transformers.LlamaConfig(num_hidden_layers=1).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}}))
    assert load_hf_config(tmp_path).model_type == "llama"


def corrupt_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:20] = b"\x00not json {{"
    file.write_bytes(bytes(data))


def test_corrupted_safetensors_header_is_named(tmp_path):
    tiny_gpt2(tmp_path)
    check_safetensors_headers(tmp_path)
    corrupt_header(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"corrupted safetensors file .*model.safetensors: its JSON header"):
        check_safetensors_headers(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ValueError, match="header length .* does not fit the file's 10 bytes"):
        check_safetensors_headers(tmp_path)


# ---- start-up errors through the CLI ----------------------------------------------------------

CUSTOM_CONFIG = '''
from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "genserve-custom"
'''
CUSTOM_MODEL = '''
from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def with_tokenizer(folder: Path, smollm2_dir) -> Path:
    transformers.AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(folder)
    return folder


def serve_fails(model_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "genserve"), "serve", "--model-id", str(model_dir), "--port", "1",
           "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "128", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    stderr = result.stderr
    assert result.returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("genserve serve: error: "), stderr[-3000:]
    assert re.search(pattern, last), last
    assert "serving" not in result.stdout + stderr and "Uvicorn running" not in result.stdout + stderr


def test_cli_unknown_architecture(tmp_path, smollm2_dir):
    folder = with_tokenizer(tmp_path, smollm2_dir)
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["NoSuch"]}))
    assert_one_line_error(serve_fails(folder), r"unknown architecture \['NoSuch'\]")


def test_cli_remote_code_needs_the_flag_and_serves_with_it(tmp_path, smollm2_dir):
    folder = with_tokenizer(tmp_path, smollm2_dir)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="genserve-custom", architectures=["CustomForCausalLM"],
               auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                         "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_custom.py").write_text(CUSTOM_MODEL)
    assert_one_line_error(serve_fails(folder), r"model_type 'genserve-custom' needs the checkpoint's own code "
                                                r".*pass --trust-remote-code")
    server = start_server(tmp_path, "--model-id", str(folder), "--trust-remote-code")
    try:
        info = httpx.get(server.base_url + "/info", timeout=10).json()
        assert info["model_path_kind"] == "transformers"
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}}
        assert len(httpx.post(server.base_url + "/generate", json=body, timeout=120).json()["details"]["tokens"]) == 3
    finally:
        server.stop()


@pytest.mark.parametrize("family", ["native", "native-2-shards", "transformers"])
def test_cli_corrupted_safetensors_header(tmp_path, smollm2_dir, family):
    folder = with_tokenizer(tmp_path, smollm2_dir)
    if family.startswith("native"):
        config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=128)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    else:
        transformers.GPTJForCausalLM(transformers.GPTJConfig(vocab_size=49152, n_positions=128, n_embd=32, n_layer=1,
                                                             n_head=4, rotary_dim=4)).save_pretrained(folder)
    corrupt_header(folder / "model.safetensors")
    extra = ["--num-shard", "2"] if family == "native-2-shards" else []
    result = serve_fails(folder, *extra)
    assert_one_line_error(result, r"corrupted safetensors file \S*model.safetensors")
    assert "tensor-parallel worker" not in result.stdout + result.stderr  # checked before any rank starts
