"""safetensors -> weight_loader: sharded files, tied heads, and clear errors on mismatches."""

from __future__ import annotations

import pytest
import torch
import transformers
from model_helpers import CONFIGS, build_metadata, load_native, make_tiny_checkpoint, run_model, torch_threads
from safetensors.torch import load_file, save_file

from genserve.server.loader import load_weights
from genserve.server.models.llama import LlamaForCausalLM


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, *CONFIGS["llama-gqa"])
    return path


def rewrite(path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def native(path) -> LlamaForCausalLM:
    return LlamaForCausalLM(transformers.AutoConfig.from_pretrained(path))


def test_loads_every_parameter_from_sharded_files(checkpoint, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = native(tmp_path)
    load_weights(model, tmp_path)
    layer = model.model.layers[1]
    q, k, v = (getattr(hf.model.layers[1].self_attn, f"{n}_proj").weight for n in "qkv")
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    gate, up = hf.model.layers[1].mlp.gate_proj.weight, hf.model.layers[1].mlp.up_proj.weight
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate, up]))
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_tied_head_ignores_saved_lm_head_and_rotary_buffers(tmp_path):
    make_tiny_checkpoint(tmp_path, *CONFIGS["llama-tied-bias"])
    rewrite(tmp_path, lambda t: t.update({
        "lm_head.weight": torch.randn_like(t["model.embed_tokens.weight"]),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
    }))
    model = load_native(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    logits = run_model(model, [1, 2, 3], [0, 1, 2], build_metadata(prefill_contexts=[([0, 1, 2], 3)]))
    assert torch.isfinite(logits).all()


def test_missing_shard_is_an_error(checkpoint, tmp_path):
    for f in checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    rewrite(tmp_path, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.self_attn.qkv_proj.weight \(shard v\)'\]"):
        load_weights(native(tmp_path), tmp_path)


def test_unexpected_weight_is_an_error(checkpoint, tmp_path):
    for f in checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    rewrite(tmp_path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.mlp.extra.weight'\]"):
        load_weights(native(tmp_path), tmp_path)


def test_wrong_shape_is_an_error(checkpoint, tmp_path):
    for f in checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(native(tmp_path), tmp_path)


def test_no_safetensors_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_weights(torch.nn.Linear(2, 2), tmp_path)
