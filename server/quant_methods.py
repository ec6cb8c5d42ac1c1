"""The one list of `--quantize` values: the server validates against it, and the CLI help, the docs and
the CRD / chart enums are written from it. Kept free of torch so the CLI can import it cheaply."""

from __future__ import annotations

# value -> what it does; the order is the order shown to users
METHODS = {
    "int8": "int8 weights, one scale per output channel, quantized at load",
    "eetq": "TGI's name for int8 (the same weights and kernels)",
    "int4": "int4 weights in groups of 128 input columns, scale and zero point per group, quantized at load",
    "int4-g32": "int4 in groups of 32 (finer, 5 bits per weight)",
    "fp8": "float8 e4m3fn weights, one scale per output channel, quantized at load",
    "gptq": "a GPTQ 4-bit safetensors checkpoint, served as it is (quantization_config read from the model)",
    "awq": "an AWQ 4-bit (GEMM) safetensors checkpoint, served as it is",
    "gguf": "a .gguf file: Q4_0 / Q4_1 / Q8_0 blocks served as they are, other types dequantized",
}
# values a checkpoint brings with it (also detected without --quantize)
CHECKPOINT_METHODS = ("gptq", "awq", "gguf")
# TGI accepts these; genserve refuses them with the reason
REFUSED = {
    "marlin": "Marlin is a CUDA kernel for GPTQ weights; serve the GPTQ checkpoint with --quantize gptq",
    "exl2": "ExLlamaV2 weights need CUDA kernels genserve does not have",
    "compressed-tensors": "compressed-tensors checkpoints are not read by genserve",
    "bitsandbytes": "bitsandbytes is not installed in genserve's image (its CPU backend needs bitsandbytes>=0.48)",
    "bitsandbytes-nf4": "bitsandbytes is not installed in genserve's image; use --quantize int4",
    "bitsandbytes-fp4": "bitsandbytes is not installed in genserve's image; use --quantize int4",
}


def check_method(method: str | None) -> None:
    """Raise ValueError, in one line naming the problem, for a value genserve does not serve."""
    if method is None or method in METHODS:
        return
    reason = REFUSED.get(method)
    if reason is not None:
        raise ValueError(f"--quantize {method} is not supported: {reason}")
    raise ValueError(f"--quantize {method}: unknown method; choose one of {', '.join(METHODS)}")


def help_text() -> str:
    return f"weight quantization: {', '.join(METHODS)} (docs/quantization.md)"
