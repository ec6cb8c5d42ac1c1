"""GPTQ and AWQ safetensors checkpoints, made here by quantizing SmolLM2 and packing with each format's own
layout (AutoGPTQ v1: int32 words along the input dim, zeros stored minus one; AutoAWQ GEMM: words along the
output dim in the interleaved order 0 2 4 6 1 3 5 7), served as grouped int4 weights: greedy tokens equal a
float model holding the dequantized weights (q - z) * s. Bad checkpoints fail in one line naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from model_helpers import load_native, make_tiny_checkpoint
from quant_reference import engine_greedy, float_checkpoint, hf_greedy, is_linear_weight, tokenize
from safetensors.torch import load_file, save_file

from genserve.server.layers.linear import LinearBase
from genserve.server.layers.quantization import quantize_model

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def quantize_rtn(weight: torch.Tensor, group_size: int):
    """weight [N, K] -> q [N, K], zero [G, N] (1..15: GPTQ v1 cannot store 0), scale [G, N] fp16."""
    n, k = weight.shape
    num_groups = -(-k // group_size)
    groups = torch.nn.functional.pad(weight.float(), (0, num_groups * group_size - k)).view(n, num_groups, -1)
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=1e-6).half()
    zero = torch.round(-low / scale.float()).clamp(1, 15)
    per_col = lambda t: t.repeat_interleave(group_size, dim=1)[:, :k]  # noqa: E731
    q = (torch.round(weight.float() / per_col(scale.float())) + per_col(zero)).clamp(0, 15).to(torch.int64)
    return q, zero.T.to(torch.int64).contiguous(), scale.T.contiguous()


def dequantized(q, zero, scale, group_size):
    k = q.shape[1]
    per_col = lambda t: t.T.repeat_interleave(group_size, dim=1)[:, :k]  # noqa: E731
    return (q - per_col(zero)).float() * per_col(scale.float())


def to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_gptq(q, zero, scale, group_size, g_idx=None):
    q_kn = q.T  # [K, N]
    shifts = torch.arange(8) * 4
    qweight = (q_kn.view(-1, 8, q_kn.shape[1]) << shifts[None, :, None]).sum(1)
    qzeros = ((zero - 1).view(zero.shape[0], -1, 8) << shifts).sum(-1)  # v1: zero - 1
    g_idx = (torch.arange(q.shape[1]) // group_size if g_idx is None else g_idx).to(torch.int32)
    return {"qweight": to_int32(qweight), "qzeros": to_int32(qzeros), "scales": scale, "g_idx": g_idx}


def pack_awq(q, zero, scale, group_size):
    shifts = torch.arange(8) * 4

    def words(values):  # [R, N] -> [R, N / 8], slot i of word c holding column 8c + AWQ_ORDER[i]
        slots = values.view(values.shape[0], -1, 8)[..., list(AWQ_ORDER)]
        return to_int32((slots << shifts).sum(-1))

    return {"qweight": words(q.T.contiguous()), "qzeros": words(zero), "scales": scale}


FORMATS = {
    "gptq": (pack_gptq, 128, {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                              "sym": False, "checkpoint_format": "gptq"}),
    "awq": (pack_awq, 64, {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                           "version": "gemm"}),
}


def write_quantized(source, target, method: str, group_size: int | None = None, act_order: bool = False):
    """Quantize `source`'s linears into `method`'s checkpoint at `target`; returns the dequantized tensors.

    act_order (GPTQ): columns quantized in a shuffled order, one per input size (layers sharing an input
    share it, as GPTQ's order follows the input's statistics); g_idx[order[i]] = i // group_size."""
    pack, default_group, config = FORMATS[method]
    group_size = group_size or default_group
    tensors = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    quantized, reference = {}, {}
    for name, weight in tensors.items():
        if not is_linear_weight(name):
            quantized[name] = reference[name] = weight
            continue
        prefix = name.removesuffix(".weight")
        if not act_order:
            q, zero, scale = quantize_rtn(weight, group_size)
            quantized.update({f"{prefix}.{part}": t for part, t in pack(q, zero, scale, group_size).items()})
            reference[name] = dequantized(q, zero, scale, group_size)
            continue
        k = weight.shape[1]
        order = torch.randperm(k, generator=torch.Generator().manual_seed(k))
        q_sorted, zero, scale = quantize_rtn(weight[:, order], group_size)
        q, g_idx, w = torch.empty_like(q_sorted), torch.empty(k, dtype=torch.int64), torch.empty_like(weight)
        q[:, order], g_idx[order], w[:, order] = q_sorted, torch.arange(k) // group_size, \
            dequantized(q_sorted, zero, scale, group_size)
        quantized.update({f"{prefix}.{part}": t for part, t in pack_gptq(q, zero, scale, group_size, g_idx).items()})
        reference[name] = w
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors"):
            shutil.copy(file, target / file.name)
    saved = json.loads((source / "config.json").read_text())
    saved["quantization_config"] = dict(config, group_size=group_size, desc_act=act_order)
    (target / "config.json").write_text(json.dumps(saved))
    save_file(quantized, str(target / "model.safetensors"))
    return reference


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_smollm2_greedy_equals_the_dequantized_float_model(smollm2_dir, tmp_path, method):
    reference = write_quantized(smollm2_dir, tmp_path / method, method)
    prompts = tokenize(smollm2_dir)
    with torch.no_grad():
        engine, quantized = engine_greedy(tmp_path / method, prompts, quantize=method)
    model = engine.runner.model
    assert model.checkpoint_quantization == method
    assert all(m.weight.dtype == torch.uint8 for m in model.modules() if isinstance(m, LinearBase))
    del engine, model
    assert quantized == hf_greedy(float_checkpoint(smollm2_dir, tmp_path / "reference", weights=reference), prompts)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, "LlamaConfig", dict(hidden_size=64, intermediate_size=96, tie_word_embeddings=True))
    return path


@pytest.mark.parametrize("method,act_order", [("gptq", False), ("awq", False), ("gptq", True)],
                         ids=["gptq", "awq", "gptq-act-order"])
def test_tiny_model_logits_equal_the_dequantized_weights(tiny_dir, tmp_path, method, act_order):
    from test_layers_tp import scenario_logits

    reference = write_quantized(tiny_dir, tmp_path / "q", method, group_size=32, act_order=act_order)
    model = load_native(tmp_path / "q")
    expected = load_native(float_checkpoint(tiny_dir, tmp_path / "f", weights=reference))
    torch.testing.assert_close(scenario_logits(model), scenario_logits(expected), rtol=1e-4, atol=1e-4)


def edit_config(path, **changes):
    saved = json.loads((path / "config.json").read_text())
    saved["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(saved))


def test_bad_checkpoints_fail_in_one_line_naming_the_problem(tiny_dir, tmp_path):
    write_quantized(tiny_dir, tmp_path / "gptq", "gptq", group_size=32)
    edit_config(tmp_path / "gptq", group_size=64)
    with pytest.raises(ValueError, match="quantization_config does not match its tensors: .*scales"):
        load_native(tmp_path / "gptq")
    edit_config(tmp_path / "gptq", group_size=32, bits=8)
    with pytest.raises(ValueError, match="bits=8: genserve serves 4-bit gptq"):
        load_native(tmp_path / "gptq")
    edit_config(tmp_path / "gptq", bits=4, quant_method="hqq")
    with pytest.raises(ValueError, match="quantized with 'hqq'"):
        load_native(tmp_path / "gptq")
    edit_config(tmp_path / "gptq", quant_method="gptq", desc_act=True)
    tensors = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.g_idx"
    tensors[name] = torch.zeros_like(tensors[name])  # one group of 96 columns, two of none
    save_file(tensors, str(tmp_path / "gptq" / "model.safetensors"))
    with pytest.raises(ValueError, match="down_proj: g_idx does not put group_size columns in each group"):
        load_native(tmp_path / "gptq")
    tensors[name] = (torch.arange(96) // 32).flip(0).to(torch.int32)  # a valid act-order
    tensors["model.layers.0.mlp.up_proj.g_idx"] = (torch.arange(64) // 32).flip(0).to(torch.int32)  # not gate's
    save_file(tensors, str(tmp_path / "gptq" / "model.safetensors"))
    with pytest.raises(ValueError, match="gate_up_proj: act-order parts with different input column orders"):
        load_native(tmp_path / "gptq")


def test_quantize_flag_must_fit_the_checkpoint(tiny_dir, tmp_path):
    write_quantized(tiny_dir, tmp_path / "awq", "awq", group_size=32)
    model = load_native(tmp_path / "awq")
    quantize_model(model, "awq")  # TGI's way: --quantize names the checkpoint's format
    for method in ("int4", "gptq"):
        with pytest.raises(ValueError, match=f"--quantize {method}: the checkpoint is already quantized \\(awq\\)"):
            quantize_model(model, method)


def write_gguf_layout(source, target, group_size: int = 32) -> None:
    """A folder as gguf_weights.py writes one from a .gguf file: linears in 4-bit groups (Q4_1's layout), the
    tied embedding in 8-bit groups (Q8_0's), `quant_method: gguf`."""
    from genserve.server.layers.grouped_weights import quantize_int4, quantize_int8

    shutil.copytree(source, target)
    tensors = {}
    for name, weight in load_file(str(source / "model.safetensors")).items():
        if is_linear_weight(name) or name == "model.embed_tokens.weight":
            quantize = quantize_int4 if is_linear_weight(name) else quantize_int8
            tensors[name], tensors[name + "_scale"], tensors[name + "_min"] = quantize(weight, group_size)
        else:
            tensors[name] = weight
    save_file(tensors, str(target / "model.safetensors"))
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "group_size": group_size}
    (target / "config.json").write_text(json.dumps(config))


def tp_worker(rank: int, world_size: int, port: int, root: str) -> None:
    import os

    from test_layers_tp import scenario_logits, tp_rank

    os.environ["GENSERVE_INT4_KERNEL"] = "ours"
    with tp_rank(rank, world_size, port):
        for name in ("float", "gptq", "awq", "gguf"):
            model = load_native(os.path.join(root, name))
            if name == "float":
                quantize_model(model, "int4-g32")
            down = model.model.layers[0].mlp.down_proj
            assert down.weight.dtype == torch.uint8 and down.weight.shape == (64, 32)  # 64 of 128 columns
            if name in ("float", "gguf"):  # the vocabulary in 8-bit groups: this rank's half of the rows
                embedding = model.model.embed_tokens
                assert embedding.weight.dtype == torch.int8 and embedding.weight.shape[0] == 48
                assert model.lm_head.weight is embedding.weight
            expected = torch.load(os.path.join(root, f"{name}_logits.pt"))
            torch.testing.assert_close(scenario_logits(model), expected, rtol=1e-4, atol=1e-4)


def test_tp2_ranks_hold_their_slices_of_the_groups(tmp_path, monkeypatch):
    """int4-g32 quantized per rank, GPTQ, AWQ and GGUF-layout g32 loaded per rank (the vocabulary too, in 8-bit
    groups for int4-g32 and GGUF): the same logits as one rank."""
    from test_layers_tp import scenario_logits, spawn_tp2

    monkeypatch.setenv("GENSERVE_INT4_KERNEL", "ours")
    make_tiny_checkpoint(tmp_path / "float", "LlamaConfig",
                         dict(hidden_size=64, intermediate_size=128, tie_word_embeddings=True))
    for name in ("gptq", "awq"):
        write_quantized(tmp_path / "float", tmp_path / name, name, group_size=32)
    write_gguf_layout(tmp_path / "float", tmp_path / "gguf")
    for name in ("float", "gptq", "awq", "gguf"):
        model = load_native(tmp_path / name)
        if name == "float":
            quantize_model(model, "int4-g32")
        torch.save(scenario_logits(model), tmp_path / f"{name}_logits.pt")
    spawn_tp2(tp_worker, str(tmp_path))


def timed_choices_worker(rank: int, world_size: int, port: int, root: str) -> None:
    from test_layers_tp import tp_rank

    from genserve.server.layers import grouped_linear

    with tp_rank(rank, world_size, port):
        model = load_native(root)
        quantize_model(model, "int4-g32")
        # each rank "times" a different limit, as two ranks on a noisy machine can: rank 0's must hold on both
        grouped_linear._int8_max_rows = lambda method, dtype: 8 if rank == 0 else 32
        grouped_linear.use_int8_activations(model)
        limits = {m.int8_max_rows for m in grouped_linear.grouped_methods(model)}
        assert limits == {8}, (rank, limits)


def test_tp2_ranks_run_rank_0s_timed_choices(tmp_path):
    from test_layers_tp import spawn_tp2

    make_tiny_checkpoint(tmp_path / "float", "LlamaConfig",
                         dict(hidden_size=64, intermediate_size=128, tie_word_embeddings=True))
    spawn_tp2(timed_choices_worker, str(tmp_path / "float"))
