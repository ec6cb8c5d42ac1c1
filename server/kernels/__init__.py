"""Native CPU kernels, compiled on first use (a few seconds) and cached per CPU and torch version.

Paged decode attention (paged_attention_cpu.cpp), the fused elementwise ops of a layer and greedy
sampling's argmax + logsumexp (elementwise_cpu.cpp), a matmul over int8 / bf16 weights widened in
registers (weight_only_linear_cpu.cpp), grouped 4/8-bit matmuls with float or int8 activations
(int4_linear_cpu.cpp, int8_dot_cpu.cpp), or bfloat16 activations on AMX tiles or AVX512-BF16 dot products
(grouped_amx_cpu.cpp, grouped_dpbf16_cpu.cpp), and a Llama decode step in one call, or greedy steps back to back
(llama_decode_cpu.cpp);
the loops they share live in the headers. They need a C++ compiler and `ninja` at
run time; without them, or with GENSERVE_CPU_KERNELS=0, the PyTorch paths run instead (gather +
SDPA for attention), which give the same results to float rounding, slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # included by the sources: part of the cache key
SOURCES = [Path(__file__).with_name(name)
           for name in ("paged_attention_cpu.cpp", "elementwise_cpu.cpp", "weight_only_linear_cpu.cpp",
                         "int4_linear_cpu.cpp", "int8_dot_cpu.cpp", "llama_decode_cpu.cpp",
                         "grouped_amx_cpu.cpp", "grouped_dpbf16_cpu.cpp")]
SUPPORTED_HEAD_DIMS = (64, 128, 256)
# -march=native: the build is tied to this CPU, hence the CPU flags in the cache key below.
# -ffast-math on the compile only: it lets GCC vectorize exp() through libmvec; linking with it
# would set flush-to-zero for the whole process.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
LDFLAGS = ["-fopenmp"]

EXTENSION = "genserve_cpu_kernels"
_loaded: bool | None = None


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return flags + platform.machine()


def build_directory() -> Path:
    from genserve.server.model_files import cache_dir

    key = hashlib.sha256()
    for part in (*(source.read_bytes() for source in (*SOURCES, *HEADERS)), " ".join(CFLAGS).encode(),
                 torch.__version__.encode(), _cpu_fingerprint().encode()):
        key.update(part)
    return cache_dir() / "kernels" / f"paged_attention_cpu-{key.hexdigest()[:16]}"


def load_cpu_kernels() -> bool:
    """Compile (once) and load the CPU kernels; False, with a warning, where that is not possible."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = False
    if os.environ.get("GENSERVE_CPU_KERNELS", "1") == "0":
        logger.info("native CPU kernels disabled by GENSERVE_CPU_KERNELS=0")
        return False
    try:
        library = build_directory() / f"{EXTENSION}.so"
        if library.is_file():
            torch.ops.load_library(str(library))
        else:
            _build(library)  # loads it too: a second dlopen would register the ops twice
        _loaded = all(hasattr(torch.ops.genserve_cpu, op)
                      for op in ("paged_decode_attention", "silu_and_mul", "rms_norm", "weight_only_linear",
                                 "int4_linear", "grouped_dequantize",
                                 "int4_linear_int8_activations", "llama_decode", "llama_decode_greedy",
                                 "greedy_pick", "int4_linear_amx", "has_amx_bf16", "int4_linear_dpbf16",
                                 "has_avx512_bf16", "set_prefetch_distance"))
    except Exception as exc:  # no compiler, no ninja, read-only cache...: the SDPA path still works
        logger.warning("native CPU kernels unavailable (%s); using the PyTorch attention path", exc)
    if _loaded:
        logger.info("native CPU kernels loaded (paged decode attention, silu_and_mul, rms_norm, weight-only linear)")
    return _loaded


def _build(library: Path) -> None:
    """Compile and load in a private temporary folder, then move the library into place atomically: ranks or
    pods building at once never wait on each other, and a build killed half-way leaves no lock behind
    (torch's own build folder lock would make every later start wait on it forever)."""
    from torch.utils.cpp_extension import load

    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent.parent, prefix=".build-") as scratch:
        load(name=EXTENSION, sources=[str(source) for source in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
             build_directory=scratch, is_python_module=False, verbose=False)
        staged = Path(scratch) / "staged.so"
        shutil.copyfile(Path(scratch) / f"{EXTENSION}.so", staged)
        os.replace(staged, library)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float, sliding_window: int | None = None, logit_softcap: float | None = None,
                           alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D]; caches [slots, KVH, D]; block_tables [B, max_blocks]; context_lens [B] -> [B, H, D].

    sliding_window: read only each context's last `sliding_window` tokens (blocks before them may be
    gone); logit_softcap: scores = c * tanh(scores / c); alibi_slopes [H] float32: scores[h] +=
    slope[h] * (key position - query position)."""
    return torch.ops.genserve_cpu.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                         block_size, scale, sliding_window or 0,
                                                         logit_softcap or 0.0, alibi_slopes)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = gate | up -> silu(gate) * up [T, I]."""
    return torch.ops.genserve_cpu.silu_and_mul(x)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) [T, H]; with `residual`, first residual += x (in place) and normalise that."""
    return torch.ops.genserve_cpu.rms_norm(x, residual, weight, eps)


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] fp32/bf16 @ weight [N, K] (bf16, or int8 with `scale` [N] per row)^T + bias -> [M, N]."""
    return torch.ops.genserve_cpu.weight_only_linear(x, weight, scale, bias)


def fits_weight_only_linear(weight: torch.Tensor) -> bool:
    """The kernel's shape rule: K a multiple of 16 (any vector width), N of 4."""
    return weight.dim() == 2 and weight.shape[1] % 16 == 0 and weight.shape[0] % 4 == 0


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group_size: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ (q * scale + min)^T + bias -> [M, N]; qweight [N, K/2] uint8 (int4_linear_cpu.cpp's layout),
    scale and min [N, ceil(K / group_size)] float32 or float16."""
    return torch.ops.genserve_cpu.int4_linear(x, qweight, scale, mins, group_size, bias)


def int4_linear_int8_activations(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
                                 group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """int4_linear with x first rounded to int8 in blocks of 32 (one float scale each, GGUF's Q8_0), then
    integer dot products (int8_dot_cpu.cpp): close to int4_linear, not equal."""
    return torch.ops.genserve_cpu.int4_linear_int8_activations(x, qweight, scale, mins, group_size, bias)


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] float32 -> (picked [N, 2] float64: argmax id and its log-probability, as the sampler
    packs them; logsumexp [N] float32)."""
    return torch.ops.genserve_cpu.greedy_pick(logits)


def llama_decode(hidden: torch.Tensor, positions: torch.Tensor, norms: list[torch.Tensor],
                 qweights: list[torch.Tensor], scales: list[torch.Tensor], mins: list[torch.Tensor],
                 group_sizes: list[int], k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 cos_sin: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, block_size: int, num_heads: int, num_kv_heads: int, attn_scale: float,
                 eps: float, int8_activations: bool) -> torch.Tensor:
    """A Llama layer stack's decode step over grouped weights in one call (llama_decode_cpu.cpp): hidden [B, H]
    embeddings -> the final norm's output [B, H]; the K/V of the step's tokens land in the caches."""
    return torch.ops.genserve_cpu.llama_decode(hidden, positions, norms, qweights, scales, mins, group_sizes,
                                               k_caches, v_caches, cos_sin, slot_mapping, block_tables,
                                               context_lens, block_size, num_heads, num_kv_heads, attn_scale, eps,
                                               int8_activations)


def llama_decode_greedy(token_ids: torch.Tensor, positions: torch.Tensor, steps: int, embedding: tuple,
                        head: tuple, head_int8: bool, norms: list[torch.Tensor], qweights: list[torch.Tensor],
                        scales: list[torch.Tensor], mins: list[torch.Tensor], group_sizes: list[int],
                        k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], cos_sin: torch.Tensor,
                        slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                        block_size: int, num_heads: int, num_kv_heads: int, attn_scale: float, eps: float,
                        int8_activations: bool) -> torch.Tensor:
    """`steps` greedy decode steps in one call (llama_decode_cpu.cpp): each embeds the rows' tokens, runs the layer
    stack, the LM head and the greedy pick, and feeds the picks to the next. token_ids / positions / context_lens
    [B] of the first step; slot_mapping [B * steps] row-major; embedding / head: (qweight, scale, min, group size)
    -> [B * steps, 2] float64 (id, log-probability), as the sampler packs them."""
    return torch.ops.genserve_cpu.llama_decode_greedy(token_ids, positions, steps, *embedding, *head, head_int8, norms,
                                                      qweights, scales, mins, group_sizes, k_caches, v_caches,
                                                      cos_sin, slot_mapping, block_tables, context_lens, block_size,
                                                      num_heads, num_kv_heads, attn_scale, eps, int8_activations)


def grouped_dequantize(qweight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight q * scale + min [N, K] of int4_linear's operands (grouped_weights.dequantize, in C++)."""
    return torch.ops.genserve_cpu.grouped_dequantize(qweight, scale, mins, group_size)


def has_amx_bf16() -> bool:
    """Whether int4_linear_amx runs here: AMX-BF16 in the CPU, in this build, and granted by the kernel (Linux)."""
    return load_cpu_kernels() and torch.ops.genserve_cpu.has_amx_bf16()


def int4_linear_amx(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """int4_linear for bfloat16 x on AMX tiles (grouped_amx_cpu.cpp): weights rounded to bf16, sums in float32."""
    return torch.ops.genserve_cpu.int4_linear_amx(x, qweight, scale, mins, group_size, bias)


def has_avx512_bf16() -> bool:
    """Whether int4_linear_dpbf16 runs here: the kernels were built for a CPU with AVX512-BF16 and -VBMI."""
    return load_cpu_kernels() and torch.ops.genserve_cpu.has_avx512_bf16()


def int4_linear_dpbf16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """int4_linear for bfloat16 x on AVX512-BF16 dot products (grouped_dpbf16_cpu.cpp): weights rounded to bf16,
    sums in float32."""
    return torch.ops.genserve_cpu.int4_linear_dpbf16(x, qweight, scale, mins, group_size, bias)


def set_prefetch_distance(tasks: int) -> None:
    """How many tasks ahead the one-row grouped kernels prefetch weights (process-wide; results do not change)."""
    torch.ops.genserve_cpu.set_prefetch_distance(tasks)
