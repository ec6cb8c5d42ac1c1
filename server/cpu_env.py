"""What the engine adapts to on the CPU it finds: how OpenMP threads wait, and which dtype is fast.

OpenMP's wait policy must be set before torch loads libgomp.

Measured on a 2-core host, SmolLM2 bf16 decode step at batch 32 (ms, idle / with another 2-thread job):
libgomp's default (long spin) 42 / 202, OMP_WAIT_POLICY=PASSIVE 61 / 86, GOMP_SPINCOUNT=3000 47 / ~100.
A short spin keeps most of the idle speed without the collapse when anything else, our own HTTP
thread included, shares the cores. An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_SPIN_COUNT = "3000"


def configure_openmp_wait(environ: MutableMapping[str, str] = os.environ) -> None:
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = DEFAULT_SPIN_COUNT


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where there is no /proc/cpuinfo)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """bfloat16 dot products in hardware (AVX512-BF16 or AMX): only there is bf16 faster than float32.
    Without them PyTorch's bf16 matmuls run 10-50x slower than float32 (measured on an AVX2 EPYC)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)
