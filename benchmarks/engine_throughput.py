"""Engine throughput vs transformers `generate` on SmolLM2 (run by hand; not a test).

64 requests with ~100-token prompts and 128 new tokens each. Our engine runs a closed loop that
keeps 32 requests in flight; transformers runs one request at a time and a static batch of 32.
Everything is measured in the same process and run, so the ratios hold even on a noisy machine.

    .venv/bin/python benchmarks/engine_throughput.py --dtypes float32 bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from genserve.server.cpu_env import configure_openmp_wait

configure_openmp_wait()  # the server's setting, before torch loads OpenMP

import torch  # noqa: E402

from genserve.server.config import EngineConfig  # noqa: E402
from genserve.server.engine import LLMEngine  # noqa: E402
from genserve.server.model_files import prepare_default_model  # noqa: E402
from genserve.server.sampling_params import SamplingParams  # noqa: E402

WORDS = ("river mountain quiet engine garden lantern history market signal winter orbit copper "
         "teacher harbor violin forest pixel thunder recipe compass meadow castle rocket velvet "
         "library desert puzzle canyon marble falcon island theory candle bridge").split()
RESULTS = Path(__file__).parent / "results"


def make_prompts(tokenizer, num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for i in range(num):
        words = [rng.choice(WORDS) for _ in range(length)]
        ids = tokenizer.encode(f"Story {i}: " + " ".join(words))
        prompts.append(ids[:length])
    return prompts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_engine(model_dir, dtype: str, prompts, max_new: int, in_flight: int, paged_kernel: bool = True) -> dict:
    engine = LLMEngine(EngineConfig(model_id=str(model_dir), dtype=dtype, max_total_tokens=512,
                                    max_batch_total_tokens=in_flight * 256 + 1024, max_batch_prefill_tokens=512))
    # False: decode through the pure-PyTorch gather + SDPA path (what runs without a C++ compiler)
    engine.runner.use_paged_kernel = engine.runner.use_paged_kernel and paged_kernel
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    engine.generate([prompts[0][:8]], SamplingParams(max_new_tokens=2))  # warm-up
    pending = list(prompts)
    submitted: dict[str, float] = {}
    ttft: dict[str, float] = {}
    order: list[str] = []
    step_times = {"prefill": [], "decode": []}
    generated = 0
    started = time.perf_counter()
    while pending or engine.has_unfinished:
        while pending and len(engine.states) < in_flight:
            rid = engine.add_request(pending.pop(0), params)
            submitted[rid] = time.perf_counter()
            order.append(rid)
        outputs, stats = engine.step()
        now = time.perf_counter()
        if stats:
            step_times[stats.method].append(stats.duration_s)
        for out in outputs:
            generated += len(out.new_tokens)
            ttft.setdefault(out.request_id, now - submitted[out.request_id])
    elapsed = time.perf_counter() - started
    steady = [ttft[r] for r in order[in_flight:]]
    return {
        "tokens_per_s": generated / elapsed,
        "elapsed_s": elapsed,
        "ttft_p50_s": percentile(steady, 0.5),
        "ttft_p90_s": percentile(steady, 0.9),
        "ttft_p90_first_burst_s": percentile([ttft[r] for r in order[:in_flight]], 0.9),
        "decode_step_ms_median": 1000 * statistics.median(step_times["decode"]),
        "prefill_step_ms_median": 1000 * statistics.median(step_times["prefill"] or [0]),
        "num_preemptions": engine.stats().num_preemptions_total,
        "native_decode_kernel": engine.runner.use_paged_kernel,
    }


def bench_transformers(model_dir, dtype: str, prompts, max_new: int, batch: int, num_single: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    kwargs = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:8]]), max_new_tokens=2, do_sample=False)
        started = time.perf_counter()
        for ids in prompts[:num_single]:
            model.generate(torch.tensor([ids]), **kwargs)
        single = num_single * max_new / (time.perf_counter() - started)
        padded = tokenizer.pad({"input_ids": prompts[:batch]}, return_tensors="pt")
        started = time.perf_counter()
        model.generate(**padded, **kwargs)
        static = batch * max_new / (time.perf_counter() - started)
        # TTFT = time to the first generated token: one prefill (alone, or of the whole static batch)
        first = dict(kwargs, max_new_tokens=1, min_new_tokens=1)
        started = time.perf_counter()
        for ids in prompts[:num_single]:
            model.generate(torch.tensor([ids]), **first)
        single_ttft = (time.perf_counter() - started) / num_single
        started = time.perf_counter()
        model.generate(**padded, **first)
        static_ttft = time.perf_counter() - started
    return {"one_at_a_time_tokens_per_s": single, "static_batch_tokens_per_s": static,
            "one_at_a_time_ttft_s": single_ttft, "static_batch_ttft_s": static_ttft}


def profile_decode(model_dir, dtype: str, prompts, in_flight: int) -> list[tuple[str, float]]:
    """Share of a batched decode step's CPU time by operator."""
    engine = LLMEngine(EngineConfig(model_id=str(model_dir), dtype=dtype, max_total_tokens=512,
                                    max_batch_total_tokens=in_flight * 256 + 1024, max_batch_prefill_tokens=4096))
    for ids in prompts[:in_flight]:
        engine.add_request(ids, SamplingParams(max_new_tokens=64, ignore_eos=True))
    for _ in range(4):
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(8):
            engine.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return [(e.key, e.self_cpu_time_total / total) for e in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--single-requests", type=int, default=3, help="transformers one-at-a-time sample size")
    parser.add_argument("--no-pytorch-decode", action="store_true",
                        help="skip the extra run of our engine with the native decode kernel off")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = prepare_default_model()
    from transformers import AutoTokenizer

    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir), args.num_requests, args.prompt_tokens)
    report = {"config": vars(args), "torch": torch.__version__, "results": {}}
    for dtype in args.dtypes:
        ours = bench_engine(model_dir, dtype, prompts, args.max_new_tokens, args.in_flight)
        pytorch_decode = None if args.no_pytorch_decode else bench_engine(
            model_dir, dtype, prompts, args.max_new_tokens, args.in_flight, paged_kernel=False)
        theirs = bench_transformers(model_dir, dtype, prompts, args.max_new_tokens, args.in_flight, args.single_requests)
        profile = profile_decode(model_dir, dtype, prompts, args.in_flight)
        ratio = ours["tokens_per_s"] / theirs["static_batch_tokens_per_s"]
        report["results"][dtype] = {"genserve": ours, "transformers": theirs, "speedup_vs_static_batch": ratio,
                                    "genserve_pytorch_decode": pytorch_decode, "decode_profile": profile}
        print(f"[{dtype}] genserve {ours['tokens_per_s']:.0f} tok/s (TTFT p90 steady {ours['ttft_p90_s']:.2f}s) | "
              f"transformers static batch {theirs['static_batch_tokens_per_s']:.0f} tok/s, one at a time "
              f"{theirs['one_at_a_time_tokens_per_s']:.0f} tok/s | speedup x{ratio:.2f}"
              + (f" | PyTorch decode path {pytorch_decode['tokens_per_s']:.0f} tok/s" if pytorch_decode else ""))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_throughput.json").write_text(json.dumps(report, indent=2))
    lines = ["# Engine throughput (SmolLM2-135M, CPU)", "",
             f"{args.num_requests} requests, ~{args.prompt_tokens}-token prompts, {args.max_new_tokens} new tokens, "
             f"{args.threads} threads, {args.in_flight} in flight (closed loop). TTFT p90 over the requests after the "
             "first burst.", "",
             "| dtype | genserve tok/s | transformers static batch tok/s | one at a time tok/s | speedup | "
             "TTFT p50 / p90 (s) | transformers TTFT static / alone (s) | decode step ms |",
             "|---|---|---|---|---|---|---|---|"]
    for dtype, r in report["results"].items():
        g, t = r["genserve"], r["transformers"]
        lines.append(f"| {dtype} | {g['tokens_per_s']:.0f} | {t['static_batch_tokens_per_s']:.0f} | "
                     f"{t['one_at_a_time_tokens_per_s']:.0f} | x{r['speedup_vs_static_batch']:.2f} | "
                     f"{g['ttft_p50_s']:.2f} / {g['ttft_p90_s']:.2f} | "
                     f"{t['static_batch_ttft_s']:.2f} / {t['one_at_a_time_ttft_s']:.2f} | "
                     f"{g['decode_step_ms_median']:.0f} |")
    lines += ["", "Same run, our engine with the native CPU decode kernel off (the pure-PyTorch gather + SDPA "
              "path used without a C++ compiler):", "",
              "| dtype | tok/s | speedup vs static batch | decode step ms | TTFT p90 (s) |", "|---|---|---|---|---|"]
    for dtype, r in report["results"].items():
        p, t = r["genserve_pytorch_decode"], r["transformers"]
        if p:
            lines.append(f"| {dtype} | {p['tokens_per_s']:.0f} | x{p['tokens_per_s'] / t['static_batch_tokens_per_s']:.2f} | "
                         f"{p['decode_step_ms_median']:.0f} | {p['ttft_p90_s']:.2f} |")
    for dtype, r in report["results"].items():
        lines += ["", f"Decode step profile, {dtype} (share of CPU time by op):", ""]
        lines += [f"- {name}: {share:.0%}" for name, share in r["decode_profile"]]
    (RESULTS / "engine_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
