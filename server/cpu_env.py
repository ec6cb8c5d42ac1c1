"""How OpenMP threads wait between parallel regions; must be set before torch loads libgomp.

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
