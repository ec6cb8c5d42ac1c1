"""oneDNN weight packing: chosen per weight shape by timing both layouts on this CPU, same results."""

from __future__ import annotations

import pytest
import torch

from genserve.server.layers import cpu_packing
from genserve.server.layers.linear import ReplicatedLinear


@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(cpu_packing, "_choices", {})
    monkeypatch.delenv("GENSERVE_CPU_LINEAR", raising=False)


def _linear(out_features=48, in_features=32):
    layer = ReplicatedLinear(in_features, out_features, bias=True)
    torch.manual_seed(0)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    return layer


def test_the_faster_layout_is_chosen_once_per_shape(fresh_choices, monkeypatch):
    if not cpu_packing.can_pack(torch.empty(4, 4)):
        pytest.skip("oneDNN packing is not available in this torch build")
    calls = []

    def timed(weight):
        calls.append(tuple(weight.shape))
        return 2.0 if weight.shape[0] == 48 else 0.5  # packed time / plain time

    monkeypatch.setattr(cpu_packing, "packed_over_plain", timed)
    assert not cpu_packing.should_pack(torch.randn(48, 32))
    assert not cpu_packing.should_pack(torch.randn(48, 32))
    assert cpu_packing.should_pack(torch.randn(64, 32))
    assert calls == [(48, 32), (64, 32)]
    monkeypatch.setenv("GENSERVE_CPU_LINEAR", "packed")
    assert cpu_packing.should_pack(torch.randn(48, 32))
    monkeypatch.setenv("GENSERVE_CPU_LINEAR", "plain")
    assert not cpu_packing.should_pack(torch.randn(64, 32))


def test_timing_measures_both_layouts_and_either_gives_the_same_output(fresh_choices):
    if not cpu_packing.can_pack(torch.empty(4, 4)):
        pytest.skip("oneDNN packing is not available in this torch build")
    assert 0 < cpu_packing.packed_over_plain(torch.randn(96, 64)) < float("inf")
    x = torch.randn(5, 32)
    reference = _linear()(x)
    for mode in ("plain", "packed", "auto"):
        layer = _linear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GENSERVE_CPU_LINEAR", mode)
            packed = layer.pack_for_cpu()
        if mode != "auto":
            assert packed == (mode == "packed")
        assert packed == (layer.packed_weight is not None)
        torch.testing.assert_close(layer(x), reference)
