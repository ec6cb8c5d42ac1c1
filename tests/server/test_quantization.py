"""`--quantize eetq|fp8`: per-layer error bounds, tiny-Llama logits, SmolLM2 greedy agreement, memory,
unsupported methods, and tensor parallelism (each rank quantizes its own shard)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from model_helpers import CONFIGS, load_native, make_tiny_checkpoint
from test_layers_tp import scenario_logits, spawn_tp2, tp_rank
from torch import nn
from transformers import AutoTokenizer

from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.layers.embedding import VocabParallelEmbedding
from genserve.server.layers.linear import LinearBase, ReplicatedLinear
from genserve.server.layers.quantization import TGI_METHODS, fp8_to, get_quant_method, quantize_model
from genserve.server.sampling_params import SamplingParams

# relative Frobenius error of one layer's output on Gaussian weights: int8 has 8 bits, e4m3 has 3 mantissa bits
LAYER_ERROR = {"eetq": 1e-2, "fp8": 4e-2}
LOGIT_ERROR = {"eetq": 2e-2, "fp8": 6e-2}
WEIGHT_DTYPE = {"eetq": torch.int8, "fp8": torch.float8_e4m3fn}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def linear_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, LinearBase)
               for p in m.parameters())


@pytest.mark.parametrize("method", ["eetq", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [3, 40], ids=["decode", "prefill"])  # bf16 int8: int8pack kernel vs dequant
def test_layer_output_error_is_small(method, dtype, rows):
    torch.manual_seed(0)
    layer = ReplicatedLinear(256, 192, bias=True).to(dtype)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = torch.randn(rows, 256, dtype=dtype)
    expected = layer(x)
    layer.quantize(get_quant_method(method))
    assert layer.weight.dtype == WEIGHT_DTYPE[method] and layer.weight_scale.shape == (192,)
    actual = layer(x)
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert relative_error(actual, expected) < LAYER_ERROR[method]


def test_int8_weights_round_to_the_nearest_step():
    torch.manual_seed(0)
    weight = torch.randn(64, 32) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    q, scale = get_quant_method("eetq").quantize_weight(weight)
    assert q.abs().amax(dim=1).eq(127).all()  # each row uses the whole int8 range
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_conversion_is_exact_for_every_value(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn)  # all but the two NaNs
    assert torch.equal(fp8_to(values, dtype), values.to(dtype))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    for name in ("llama-gqa", "llama-tied-bias"):
        make_tiny_checkpoint(root / name, *CONFIGS[name])
    return root


@pytest.mark.parametrize("method", ["eetq", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied-bias"])
def test_tiny_llama_logits_close_to_unquantized(tiny_dirs, name, dtype, method):
    expected = scenario_logits(load_native(tiny_dirs / name, dtype=dtype))
    model = load_native(tiny_dirs / name, dtype=dtype)
    quantize_model(model, method)
    actual = scenario_logits(model)
    assert relative_error(actual, expected) < LOGIT_ERROR[method]
    # the argmax holds wherever the reference's top two are further apart than rounding (int8 puts the LM head
    # in 8-bit groups too; one bf16 row of this random model has its top two 0.004 apart)
    top2 = expected.float().topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 0.01
    assert clear.sum() >= len(clear) - 2 and torch.equal(actual.argmax(-1)[clear], expected.argmax(-1)[clear])


@pytest.mark.parametrize("method", ["eetq", "fp8"])
def test_linear_weights_shrink_to_a_quarter_of_fp32(tiny_dirs, method):
    model = load_native(tiny_dirs / "llama-tied-bias")
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    weight_bytes = sum(m.weight.numel() * 4 for m in linears)
    bias_bytes = sum(m.bias.numel() * 4 for m in linears)
    scale_bytes = sum(m.weight.shape[0] * 4 for m in linears)  # one fp32 scale per output row
    assert linear_bytes(model) == weight_bytes + bias_bytes
    quantize_model(model, method)
    assert sum(m.weight.numel() * m.weight.element_size() for m in linears) * 4 == weight_bytes
    assert linear_bytes(model) == weight_bytes // 4 + scale_bytes + bias_bytes
    kept = [p for m in model.modules() if not isinstance(m, (LinearBase, VocabParallelEmbedding))
            for p in m.parameters(recurse=False)]
    assert kept and all(p.dtype == torch.float32 for p in kept)  # norms
    # int8 holds the embedding (and the LM head tied to it) in 8-bit groups of 32; fp8 leaves them float
    embedding = model.model.embed_tokens
    assert embedding.weight.dtype == (torch.int8 if method == "eetq" else torch.float32)
    assert model.lm_head.weight is embedding.weight


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied-bias"])
def test_int8_vocabulary_logits_equal_the_dequantized_rows(tiny_dirs, name):
    from genserve.server.layers.embedding import quantize_vocabulary
    from genserve.server.layers.grouped_weights import dequantize

    model = load_native(tiny_dirs / name)
    assert quantize_vocabulary(model)
    embedding, head = model.model.embed_tokens, model.lm_head
    assert embedding.weight.dtype == head.weight.dtype == torch.int8 and embedding.weight_scale.shape == (96, 2)
    assert (head.weight is embedding.weight) == (name == "llama-tied-bias")  # tied: one copy of the rows
    reference = load_native(tiny_dirs / name)
    for ours, theirs in ((embedding, reference.model.embed_tokens), (head, reference.lm_head)):
        theirs.weight.data.copy_(dequantize(ours.weight, ours.weight_scale, ours.weight_min, 32))
    # prefill rows, a decode row beside a chunked prefill: lookups and the grouped kernel's logits
    torch.testing.assert_close(scenario_logits(model), scenario_logits(reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [m for m in TGI_METHODS if m not in ("eetq", "fp8")] + ["int3", "EETQ"])
def test_unsupported_methods_raise_a_clear_error(tiny_dirs, method):
    model = load_native(tiny_dirs / "llama-gqa")
    with pytest.raises(ValueError, match=f"^--quantize {method}(:| is not supported: | needs a {method} checkpoint)"):
        quantize_model(model, method)
    assert all(m.quant_method is None for m in model.modules() if isinstance(m, LinearBase))


def test_no_method_leaves_the_model_alone(tiny_dirs):
    model = load_native(tiny_dirs / "llama-gqa")
    quantize_model(model, None)
    assert all(m.quant_method is None and m.weight.dtype == torch.float32
               for m in model.modules() if isinstance(m, LinearBase))


def test_models_without_parallel_linears_are_rejected():
    with pytest.raises(ValueError, match="needs genserve's native model implementation"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "eetq")


def test_engine_rejects_unsupported_method_and_the_transformers_fallback(tiny_dirs, smollm2_dir):
    settings = dict(model_id=str(smollm2_dir), dtype="float32", max_batch_total_tokens=1024, max_total_tokens=256)
    with pytest.raises(ValueError, match="--quantize gptq needs a gptq checkpoint"):
        LLMEngine(EngineConfig(**settings, quantize="gptq"))
    with pytest.raises(ValueError, match="transformers fallback"):
        LLMEngine(EngineConfig(**settings, quantize="eetq", use_transformers_fallback=True))


SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
SMOL_NEW = 16
SMOL_MIN_AGREEMENT = 0.7  # measured 1.0: every prompt's first 16 greedy tokens equal the fp32 ones


def smol_greedy(model_dir, quantize):
    engine = LLMEngine(EngineConfig(model_id=str(model_dir), quantize=quantize, dtype="float32",
                                    max_batch_total_tokens=4096, max_total_tokens=512))
    tok = AutoTokenizer.from_pretrained(model_dir)
    outputs = engine.generate([tok.encode(p) for p in SMOL_PROMPTS], SamplingParams(max_new_tokens=SMOL_NEW))
    return engine, tok, outputs


def agreement(reference: list[int], other: list[int]) -> float:
    """Fraction of the reference's tokens reproduced before the first divergence."""
    same = next((i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b),
                min(len(reference), len(other)))
    return same / len(reference)


def test_smollm2_eetq_greedy_mostly_matches_unquantized(smollm2_dir):
    _, tok, reference = smol_greedy(smollm2_dir, None)
    engine, _, quantized = smol_greedy(smollm2_dir, "eetq")
    assert engine.runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    scores = [agreement(r, q) for r, q in zip(reference, quantized, strict=True)]
    assert sum(scores) / len(scores) >= SMOL_MIN_AGREEMENT, (scores, [tok.decode(q) for q in quantized])
    assert "Paris" in tok.decode(quantized[0])


def tp_worker(rank: int, world_size: int, port: int, path: str) -> None:
    with tp_rank(rank, world_size, port):
        model = load_native(path)
        full = torch.load(os.path.join(path, "full_weights.pt"))
        quantize_model(model, "eetq")
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == torch.int8 and qkv.weight.shape[0] == full["qkv_rows"] // 2
        # column-parallel rows are whole output channels: the shard's scales are the full matrix's
        gate_up = model.model.layers[0].mlp.gate_up_proj
        rows = gate_up.weight.shape[0] // 2
        for half in range(2):
            start = half * full["gate_up_rows"] // 2 + rank * rows
            torch.testing.assert_close(gate_up.weight_scale[half * rows:(half + 1) * rows],
                                       full["gate_up_scale"][start:start + rows])
        expected = torch.load(os.path.join(path, "expected_logits.pt"))
        assert relative_error(scenario_logits(model), expected) < LOGIT_ERROR["eetq"]


def test_tp2_ranks_quantize_their_own_shards(tmp_path):
    make_tiny_checkpoint(tmp_path, *CONFIGS["llama-gqa"])
    model = load_native(tmp_path)
    torch.save(scenario_logits(model), tmp_path / "expected_logits.pt")
    quantize_model(model, "eetq")
    layer = model.model.layers[0]
    torch.save({"qkv_rows": layer.self_attn.qkv_proj.weight.shape[0],
                "gate_up_rows": layer.mlp.gate_up_proj.weight.shape[0],
                "gate_up_scale": layer.mlp.gate_up_proj.weight_scale.data}, tmp_path / "full_weights.pt")
    spawn_tp2(tp_worker, str(tmp_path))


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("weight_dtype", [torch.int8, torch.bfloat16], ids=["int8", "bf16"])
def test_weight_only_kernel_equals_the_dequantized_matmul(rows, weight_dtype):
    from genserve.server import kernels

    if not kernels.load_cpu_kernels():
        pytest.skip("no C++ compiler here: the native kernels cannot build")
    torch.manual_seed(rows)
    x, bias = torch.randn(rows, 576), torch.randn(1536)
    if weight_dtype is torch.int8:
        weight, scale = torch.randint(-127, 128, (1536, 576), dtype=torch.int8), torch.rand(1536) / 100
        expected = F.linear(x, weight.float()) * scale + bias
    else:
        weight, scale = torch.randn(1536, 576).bfloat16(), None
        expected = F.linear(x, weight.float(), bias)
    torch.testing.assert_close(kernels.weight_only_linear(x, weight, scale, bias), expected, atol=1e-4, rtol=1e-4)
    # bf16 activations come back in bf16
    out = kernels.weight_only_linear(x.bfloat16(), weight, scale, None)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1536)
    with pytest.raises(RuntimeError, match="multiple"):
        kernels.weight_only_linear(x[:, :570], weight[:, :570], scale, None)
    # the eetq layer takes this path for float32 decode batches
    layer = ReplicatedLinear(576, 1536, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.copy_(bias)
    layer.quantize(get_quant_method("eetq"))
    reference = F.linear(x, layer.weight.float()) * layer.weight_scale + bias
    torch.testing.assert_close(layer(x), reference, atol=1e-4, rtol=1e-4)


# --- int4 (our quantization at load): grouped weights, greedy equal to the dequantized float model ---

INT4_TINY = dict(hidden_size=64, intermediate_size=96)  # multiples of 32, as 4-bit blocks need


@pytest.mark.parametrize("method,group_size", [("int4", 128), ("int4-g32", 32)])
def test_int4_layers_hold_packed_groups_and_keep_the_argmax(tmp_path, monkeypatch, method, group_size):
    monkeypatch.setenv("GENSERVE_INT4_KERNEL", "ours")  # tiny shapes: torch's matmul may win the timing
    make_tiny_checkpoint(tmp_path, "LlamaConfig", dict(INT4_TINY, tie_word_embeddings=True, attention_bias=True))
    expected = scenario_logits(load_native(tmp_path))
    model = load_native(tmp_path)
    quantize_model(model, method)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.uint8 and down.weight.shape == (64, 48)
    assert down.weight_scale.shape == (64, -(-96 // group_size)) and down.weight_min.dtype == torch.float16
    actual = scenario_logits(model)
    assert relative_error(actual, expected) < 0.15
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8


def int4_layer(monkeypatch, kernel: str) -> ReplicatedLinear:
    monkeypatch.setenv("GENSERVE_INT4_KERNEL", kernel)
    torch.manual_seed(0)
    layer = ReplicatedLinear(576, 192, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    quantize_model(nn.Sequential(layer), "int4-g32")
    assert (layer.quant_method.torch_int4 is not None) == (kernel == "torch")
    return layer


def test_int4_kernels_and_prefill_path_agree_with_the_dequantized_weight(monkeypatch):
    from genserve.server.layers.grouped_linear import GROUPED_MAX_ROWS

    layer = int4_layer(monkeypatch, "ours")
    reference = ReplicatedLinear(576, 192, bias=True)
    reference.weight.data.copy_(layer.quant_method.dequantized(torch.float32))
    reference.bias.data.copy_(layer.bias)
    x = torch.randn(GROUPED_MAX_ROWS + 4, 576)
    expected = reference(x)
    decode = torch.cat([layer(x[i:i + 4]) for i in range(0, len(x), 4)])  # 4 rows: our kernel
    torch.testing.assert_close(decode, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)  # more rows: dequantize + dense GEMM
    torch_layer = int4_layer(monkeypatch, "torch")  # the same weights in torch's packed int4 layout
    torch.testing.assert_close(torch_layer(x[:4]), expected[:4], rtol=1e-3, atol=1e-3)


def test_checkpoint_formats_need_their_checkpoint_and_refused_methods_say_why(tiny_dirs):
    model = load_native(tiny_dirs / "llama-gqa")
    with pytest.raises(ValueError, match="--quantize gptq needs a gptq checkpoint"):
        quantize_model(model, "gptq")
    with pytest.raises(ValueError, match="--quantize bitsandbytes-nf4 is not supported: bitsandbytes"):
        quantize_model(model, "bitsandbytes-nf4")
    with pytest.raises(ValueError, match="--quantize int3: unknown method; choose one of int8, eetq, int4"):
        quantize_model(model, "int3")
    model.checkpoint_quantization = "gptq"
    with pytest.raises(ValueError, match="already quantized \\(gptq\\)"):
        quantize_model(model, "int4")


def test_a_row_parallel_shard_must_hold_whole_groups():
    from genserve.server.layers import grouped_linear
    from genserve.server.layers.linear import RowParallelLinear

    layer = RowParallelLinear(576, 64)
    layer.tp_size, layer.tp_rank, layer.input_size = 2, 1, 288  # rank 1's shard of 576 columns
    with pytest.raises(ValueError, match="288 input columns .* does not hold whole groups of 128"):
        grouped_linear.check_groups(layer, 128)
    grouped_linear.check_groups(layer, 32)  # 288 = 9 groups of 32


def test_one_list_of_methods_feeds_the_cli_help():
    from genserve.server import quant_methods
    from genserve.server.cli import ENGINE_HELP

    assert ENGINE_HELP["quantize"] == quant_methods.help_text()
    assert set(TGI_METHODS) <= set(quant_methods.METHODS) | set(quant_methods.REFUSED)


def int8_groups(weight: torch.Tensor) -> torch.Tensor:
    """The embedding / LM head as --quantize int8 / int4 serve them: 8-bit groups of 32, dequantized."""
    from genserve.server.layers.grouped_weights import dequantize, quantize_int8

    return dequantize(*quantize_int8(weight, 32), 32)


def linear_storage_bytes(model: nn.Module) -> int:
    """Bytes allocated for the linears' weights (and their scales / mins), each storage counted once."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for m in model.modules() if isinstance(m, LinearBase)
                for name, p in m.named_parameters(recurse=False) if name != "bias"}
    return sum(storages.values())


@pytest.mark.parametrize("method", ["int4", "int4-g32"])
def test_smollm2_int4_greedy_equals_the_dequantized_float_model(smollm2_dir, tmp_path, method):
    from quant_reference import engine_greedy, float_checkpoint, hf_greedy, tokenize

    from genserve.server.layers.grouped_weights import dequantize, quantize_int4

    group_size = {"int4": 128, "int4-g32": 32}[method]
    prompts = tokenize(smollm2_dir)
    with torch.no_grad():
        engine, quantized = engine_greedy(smollm2_dir, prompts, quantize=method)
    model = engine.runner.model
    bf16_bytes = sum(m.input_size * m.output_size * 2 for m in model.modules() if isinstance(m, LinearBase))
    ratio = linear_storage_bytes(model) / bf16_bytes
    assert ratio < {"int4": 0.28, "int4-g32": 0.36}[method], ratio  # 4 bits + fp16 scale and min per group
    del engine, model
    reference_dir = float_checkpoint(smollm2_dir, tmp_path / "dequantized",
                                     transform=lambda name, w: dequantize(*quantize_int4(w, group_size), group_size),
                                     vocab_transform=int8_groups)
    assert quantized == hf_greedy(reference_dir, prompts)


def test_smollm2_int8_greedy_equals_the_dequantized_float_model(smollm2_dir, tmp_path):
    from quant_reference import engine_greedy, float_checkpoint, hf_greedy, tokenize

    int8 = get_quant_method("int8")
    prompts = tokenize(smollm2_dir)
    with torch.no_grad():
        engine, quantized = engine_greedy(smollm2_dir, prompts, quantize="int8")
    model = engine.runner.model
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert model.model.embed_tokens.weight.dtype == torch.int8 and model.lm_head.weight is model.model.embed_tokens.weight
    del engine, model

    def dequantized(name, weight):
        q, scale = int8.quantize_weight(weight)
        return q.float() * scale.float()[:, None]

    reference_dir = float_checkpoint(smollm2_dir, tmp_path / "dequantized", transform=dequantized,
                                     vocab_transform=int8_groups)
    assert quantized == hf_greedy(reference_dir, prompts)
