"""CPU facts the engine adapts to: OpenMP's wait policy and the dtype `--dtype auto` picks."""

from __future__ import annotations

import torch

from genserve.server import cpu_env
from genserve.server.model_runner import resolve_dtype


def test_openmp_wait_defaults_to_a_short_spin_unless_set():
    env = {}
    cpu_env.configure_openmp_wait(env)
    assert env == {"GOMP_SPINCOUNT": cpu_env.DEFAULT_SPIN_COUNT}
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    cpu_env.configure_openmp_wait(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 fma avx512_bf16\n")
    assert {"avx2", "fma", "avx512_bf16"} <= cpu_env.cpu_flags(str(info))
    assert cpu_env.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch):
    assert cpu_env.has_native_bf16(frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert cpu_env.has_native_bf16(frozenset({"avx512f", "avx512_bf16"}))
    assert not cpu_env.has_native_bf16(frozenset({"avx2", "fma", "avx512f", "avx512bw"}))
    cpu = torch.device("cpu")
    monkeypatch.setattr(cpu_env, "has_native_bf16", lambda: True)
    assert resolve_dtype("auto", None, cpu) is torch.bfloat16
    monkeypatch.setattr(cpu_env, "has_native_bf16", lambda: False)
    assert resolve_dtype("auto", None, cpu) is torch.float32
    assert resolve_dtype("bfloat16", None, cpu) is torch.bfloat16  # an explicit dtype always wins
