"""Every native family at tp=2 (gloo on CPU, two spawned ranks, each loading only its shards): logits of batched
prefill, decode and chunked prefill over a cached prefix equal transformers float32."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from family_configs import family_configs, save_family
from model_helpers import build_metadata, load_native, run_model
from test_layers_tp import free_port

from genserve.server.layers.attention import Attention


def metadata(decode_contexts=(), prefill_contexts=()):
    meta = build_metadata(decode_contexts, prefill_contexts)
    if decode_contexts:
        meta.decode_context_lens = torch.tensor([len(ctx) for ctx in decode_contexts])
    return meta


def scenario(a: list[int], b: list[int]) -> list[tuple[list[int], list[int], object]]:
    """(ids, positions, metadata) of two steps: prefill a and b's first 12 tokens; decode a while b's rest
    prefills on its cached prefix."""
    first = (a + b[:12], list(range(len(a))) + list(range(12)),
             metadata(prefill_contexts=[(list(range(len(a))), len(a)), (list(range(40, 52)), 12)]))
    second = ([89] + b[12:], [len(a)] + list(range(12, len(b))),
              metadata(decode_contexts=[list(range(len(a) + 1))], prefill_contexts=[(list(range(40, 40 + len(b))),
                                                                                     len(b) - 12)]))
    return [first, second]


A, B = [3, 14, 15, 92, 65, 35, 8, 9, 79, 32, 38], list(range(20, 50))


def hf_scenario_logits(hf) -> torch.Tensor:
    with torch.no_grad():
        full_a = hf(torch.tensor([A + [89]])).logits[0]
        full_b = hf(torch.tensor([B])).logits[0]
    return torch.cat([full_a[:len(A)], full_b[:12], full_a[len(A):], full_b[12:]]).float()


def tp_worker(rank: int, port: int, cases: list[tuple[str, str]]) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, path in cases:
            model = load_native(path)
            layers = [m for m in model.modules() if isinstance(m, Attention)]
            full = torch.load(os.path.join(path, "heads.pt"))
            assert [a.num_heads * 2 for a in layers] == full, name
            logits = torch.cat([run_model(model, *step) for step in scenario(A, B)])
            expected = torch.load(os.path.join(path, "expected_logits.pt"))
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4, msg=name)
        dist.barrier()  # see test_layers_tp: leaving first can abort the other rank's last collective
    finally:
        dist.destroy_process_group()


def test_every_family_at_two_shards_matches_transformers(tmp_path):
    cases = []
    for name in family_configs():
        path = tmp_path / name
        hf = save_family(path, name)
        torch.save(hf_scenario_logits(hf), path / "expected_logits.pt")
        text = hf.config.get_text_config()  # a multimodal checkpoint's text model
        torch.save([text.num_attention_heads] * text.num_hidden_layers, path / "heads.pt")
        cases.append((name, str(path)))
    mp.spawn(tp_worker, args=(free_port(), cases), nprocs=2, join=True)
