"""Decode attention backends on CPU: one layer's decode over a paged pool with shuffled blocks.

kernel (native, reads in place), gather (padded copy + SDPA with a mask), varlen (packed copy, no
padding; off CUDA one SDPA call per row stands in for FlashAttention's varlen kernel), and
flex_attention run eagerly (a paged mask over the whole pool; eager flex is its math reference).
Each backend's per-step metadata is built once outside the timing (the runner builds it once per
step for every layer). Median of --repeats calls, after one warm-up.

    .venv/bin/python benchmarks/decode_attention.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from genserve.server import kernels
from genserve.server.layers.attention import Attention, AttentionMetadata, set_decode_metadata

RESULTS = Path(__file__).parent / "results"
BS = 16
SHAPES = {"SmolLM2-135M (9 q / 3 kv heads, d 64)": (9, 3, 64), "Llama-3-8B (32 / 8, d 128)": (32, 8, 128)}


def pool(lens, num_kv_heads, head_dim, dtype, seed=0):
    rng = random.Random(seed)
    needed = [-(-n // BS) for n in lens]
    free = list(range(sum(needed) + 8))
    rng.shuffle(free)
    tables = []
    for n in needed:
        tables.append(free[:n] + [0] * (max(needed) - n))
        free = free[n:]
    slots = (sum(needed) + 8) * BS
    k = torch.randn(slots, num_kv_heads, head_dim).to(dtype)
    return k, torch.randn_like(k), torch.tensor(tables), torch.tensor(lens)


def flex_decode(q, k_cache, v_cache, tables, lens):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    owner = torch.full((k_cache.shape[0],), -1, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        slots = torch.tensor([tables[b, t // BS].item() * BS + t % BS for t in range(n)])
        owner[slots] = b
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: owner[kv_idx] == q_idx, 1, None, q.shape[0],
                             k_cache.shape[0], device="cpu", BLOCK_SIZE=128)

    def run():
        out = flex_attention(q.transpose(0, 1)[None], k_cache.transpose(0, 1)[None], v_cache.transpose(0, 1)[None],
                             block_mask=mask, enable_gqa=True, scale=q.shape[-1] ** -0.5)
        return out[0].transpose(0, 1)
    return run


def timed(fn, repeats):
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-flex", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    has_kernel = kernels.load_cpu_kernels()
    cases = [(1, "2048"), (8, "256..2048"), (32, "256..2048"), (32, "1000..1032")]
    rows = []
    for shape_name, (heads, kv_heads, head_dim) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            for batch, spread in cases:
                lo, hi = map(int, spread.split("..")) if ".." in spread else (int(spread), int(spread))
                rng = random.Random(batch)
                lens = [rng.randint(lo, hi) for _ in range(batch)]
                k_cache, v_cache, tables, context_lens = pool(lens, kv_heads, head_dim, dtype)
                q = torch.randn(batch, heads, head_dim).to(dtype)
                layer = Attention(heads, kv_heads, head_dim, head_dim ** -0.5)
                layer.k_cache, layer.v_cache = k_cache, v_cache
                row = {"shape": shape_name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                       "context": spread, "padding": round(batch * max(lens) / sum(lens), 2)}
                for backend in ("kernel", "gather", "varlen"):
                    if backend == "kernel" and not (has_kernel and head_dim in kernels.SUPPORTED_HEAD_DIMS):
                        continue
                    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=batch)
                    set_decode_metadata(meta, backend, tables, context_lens, BS, max(lens), lens)
                    with torch.inference_mode():
                        row[f"{backend}_ms"] = round(timed(lambda m=meta, a=layer, x=q: a._decode(x, m), args.repeats), 3)
                if not args.no_flex and batch <= 8 and dtype == torch.float32:
                    row["flex_eager_ms"] = round(timed(flex_decode(q, k_cache, v_cache, tables, context_lens), 2), 3)
                print(row, flush=True)
                rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    meta = {"threads": args.threads, "torch": torch.__version__, "block_size": BS, "rows": rows}
    (RESULTS / "decode_attention.json").write_text(json.dumps(meta, indent=1) + "\n")
    columns = ["shape", "dtype", "batch", "context", "padding", "kernel_ms", "gather_ms", "varlen_ms", "flex_eager_ms"]
    lines = [f"# Decode attention on CPU, one layer ({args.threads} thread(s), torch {torch.__version__})", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    (RESULTS / "decode_attention.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
