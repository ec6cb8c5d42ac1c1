"""What structured output costs (run by hand; not a test): the same closed loop of requests on SmolLM2,
free and held to a JSON schema, measured in one process and run.

Reports generated tokens/s, the median decode step and the share of the run spent building and
applying grammar masks (timed around the sampler's mask step).

    .venv/bin/python benchmarks/structured_output.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from genserve.server.cpu_env import configure_openmp_wait

configure_openmp_wait()

import torch  # noqa: E402

from genserve.server import sampler as sampler_module  # noqa: E402
from genserve.server.config import EngineConfig  # noqa: E402
from genserve.server.engine import LLMEngine  # noqa: E402
from genserve.server.grammar import GrammarSpec  # noqa: E402
from genserve.server.model_files import prepare_default_model  # noqa: E402
from genserve.server.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 24}, "skills": {"type": "array", "items": {"type": "string",
                                                                                      "maxLength": 16},
                                                             "maxItems": 3}},
    "required": ["name", "age", "city", "skills"], "additionalProperties": False}
TOPICS = "teacher pilot chef nurse farmer painter engineer sailor writer doctor baker miner".split()


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, in_flight: int) -> dict:
    mask_time = 0.0
    original = sampler_module.apply_grammars

    def timed(raw, rows):
        nonlocal mask_time
        started = time.perf_counter()
        try:
            return original(raw, rows)
        finally:
            mask_time += time.perf_counter() - started

    sampler_module.apply_grammars = timed
    pending, generated, decode_steps = list(prompts), 0, []
    texts: dict[str, list[int]] = {}
    started = time.perf_counter()
    try:
        while pending or engine.has_unfinished:
            while pending and len(engine.states) < in_flight:
                texts[engine.add_request(pending.pop(0), params)] = []
            outputs, stats = engine.step()
            if stats and stats.method == "decode":
                decode_steps.append(stats.duration_s)
            for out in outputs:
                generated += len(out.new_tokens)
                texts[out.request_id].extend(t.id for t in out.new_tokens)
    finally:
        sampler_module.apply_grammars = original
    elapsed = time.perf_counter() - started
    valid = 0
    for tokens in texts.values():
        try:
            json.loads(engine.tokenizer.decode(tokens, skip_special_tokens=True))
            valid += 1
        except json.JSONDecodeError:
            pass
    return {"tokens_per_s": generated / elapsed, "elapsed_s": elapsed, "generated_tokens": generated,
            "decode_step_ms_median": 1000 * statistics.median(decode_steps), "mask_share": mask_time / elapsed,
            "mask_ms_per_decode_step": 1000 * mask_time / max(len(decode_steps), 1),
            "valid_json": valid, "requests": len(texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = prepare_default_model()
    engine = LLMEngine(EngineConfig(model_id=str(model_dir), dtype=args.dtype, max_total_tokens=512,
                                    max_batch_total_tokens=args.in_flight * 256 + 1024,
                                    max_batch_prefill_tokens=512))
    tok = engine.tokenizer
    prompts = []
    for i in range(args.num_requests):
        text = f"Describe a {TOPICS[i % len(TOPICS)]} named person #{i} as JSON with name, age, city and skills."
        prompts.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True)))
    engine.generate([prompts[0][:8]], SamplingParams(max_new_tokens=2))  # warm-up
    engine.grammars.warm_up()
    free = run(engine, prompts, SamplingParams(max_new_tokens=args.max_new_tokens), args.in_flight)
    held = run(engine, prompts, SamplingParams(max_new_tokens=args.max_new_tokens,
                                               grammar=GrammarSpec.json_schema(SCHEMA)), args.in_flight)
    report = {"config": vars(args), "torch": torch.__version__, "free": free, "json_schema": held}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structured_output.json").write_text(json.dumps(report, indent=2))
    lines = ["# Structured output cost (SmolLM2-135M, CPU)", "",
             f"{args.num_requests} chat requests asking for a person as JSON, {args.in_flight} in flight (closed "
             f"loop), greedy, up to {args.max_new_tokens} new tokens, {args.dtype}, {args.threads} threads; "
             "both runs in one process.", "",
             "| run | tok/s | decode step ms (median) | mask ms per decode step | share of run in masks | "
             "valid JSON |", "|---|---|---|---|---|---|"]
    for name, r in (("free", free), ("JSON schema", held)):
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['decode_step_ms_median']:.1f} | "
                     f"{r['mask_ms_per_decode_step']:.2f} | {r['mask_share']:.1%} | {r['valid_json']}/{r['requests']} |")
    lines += ["", f"Decode step with grammars / without: x{held['decode_step_ms_median'] / free['decode_step_ms_median']:.2f}."]
    (RESULTS / "structured_output.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
