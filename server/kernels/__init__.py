"""Native CPU kernels, compiled on first use (a few seconds) and cached per CPU and torch version.

Only one so far: paged decode attention (paged_attention_cpu.cpp). It needs a C++ compiler and
`ninja` at run time; without them, or with GENSERVE_CPU_KERNELS=0, attention falls back to the
pure-PyTorch path (gather + SDPA), which gives the same results a little slower.
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

SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")
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
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), torch.__version__.encode(),
                 _cpu_fingerprint().encode()):
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
        _loaded = hasattr(torch.ops.genserve_cpu, "paged_decode_attention")
    except Exception as exc:  # no compiler, no ninja, read-only cache...: the SDPA path still works
        logger.warning("native CPU kernels unavailable (%s); using the PyTorch attention path", exc)
    if _loaded:
        logger.info("native CPU paged decode attention loaded")
    return _loaded


def _build(library: Path) -> None:
    """Compile and load in a private temporary folder, then move the library into place atomically: ranks or
    pods building at once never wait on each other, and a build killed half-way leaves no lock behind
    (torch's own build folder lock would make every later start wait on it forever)."""
    from torch.utils.cpp_extension import load

    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent.parent, prefix=".build-") as scratch:
        load(name=EXTENSION, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
             build_directory=scratch, is_python_module=False, verbose=False)
        staged = Path(scratch) / "staged.so"
        shutil.copyfile(Path(scratch) / f"{EXTENSION}.so", staged)
        os.replace(staged, library)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    """q [B, H, D]; caches [slots, KVH, D]; block_tables [B, max_blocks]; context_lens [B] -> [B, H, D]."""
    return torch.ops.genserve_cpu.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                         block_size, scale)
