"""`genserve benchmark` (run a load test) and `genserve benchmark plot` (merge result files)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from genserve.server.benchmark.config import (
    API_PATHS,
    BenchmarkConfig,
    BenchmarkError,
    LoadConfig,
    RequestConfig,
    WorkloadConfig,
)


def _list(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, not {text!r}") from None
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _add_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-json", metavar="FILE", help="results as JSON")
    p.add_argument("--output-md", metavar="FILE", help="results as a Markdown table")
    p.add_argument("--output-png", metavar="FILE", help="plot: output tok/s against TTFT p90 (needs matplotlib)")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "benchmark", help="load-test a running OpenAI or TGI endpoint (streaming; TTFT, ITL, throughput, goodput)",
        description="Stream requests to a running server at fixed concurrency levels (closed loop) and/or request "
                    "rates (open loop, Poisson arrivals), and report latency percentiles, throughput, errors by "
                    "HTTP status and goodput under an SLO. `genserve benchmark plot A.json B.json` merges results. "
                    "See docs/benchmark.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = p.add_argument_group("endpoint")
    target.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    target.add_argument("--api", choices=list(API_PATHS), default="completions",
                        help="completions: /v1/completions, chat: /v1/chat/completions, tgi: /generate_stream")
    target.add_argument("--model", help="`model` field of OpenAI requests; default: the first of /v1/models")
    target.add_argument("--wait-ready", type=float, default=0.0, metavar="SECONDS",
                        help="retry GET /health (or /v1/models) this long before giving up")
    target.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="whole-request limit; a request over it counts as a `timeout` error")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=_list(int), default=[], metavar="N,N,...",
                      help="closed-loop levels: requests kept in flight (default 1 when no --request-rate)")
    load.add_argument("--request-rate", type=_list(float), default=[], metavar="R,R,...",
                      help="open-loop levels: Poisson arrivals at R requests/s")
    load.add_argument("--num-prompts", type=int, default=0,
                      help="requests per level; 0: 4 x concurrency, or 20 s of arrivals, at least 8")
    load.add_argument("--warmup", type=int, default=1, help="requests sent (one at a time) before the first level")
    load.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    work = p.add_argument_group("prompts")
    work.add_argument("--input-tokens", type=int, default=128, help="synthetic prompt length, by --tokenizer")
    work.add_argument("--output-tokens", type=int, default=128, help="max_tokens / max_new_tokens per request")
    work.add_argument("--dataset", metavar="FILE.jsonl",
                      help='prompts instead of synthetic ones: {"prompt": ...} or {"messages": [...]}, '
                           'optional "output_tokens", one a line')
    work.add_argument("--tokenizer", help="HF folder or Hub id for synthetic prompts; default: genserve's built-in model")
    req = p.add_argument_group("request fields")
    req.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="send vLLM's `ignore_eos` so outputs reach --output-tokens (OpenAI APIs; TGI has none)")
    req.add_argument("--request-usage", action=argparse.BooleanOptionalAction, default=True,
                     help="send stream_options.include_usage to count output tokens from the server's usage")
    req.add_argument("--temperature", type=float, default=0.0)
    req.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                     help="merged into each request body (TGI: into `parameters`)")
    out = p.add_argument_group("report")
    out.add_argument("--label", default="genserve", help="the system's name in tables and plots")
    out.add_argument("--slo-ttft", type=float, metavar="SECONDS", help="goodput SLO on time to first token")
    out.add_argument("--slo-itl", type=float, metavar="SECONDS", help="goodput SLO on mean inter-token latency")
    _add_outputs(out)
    out.add_argument("--save-requests", action="store_true", help="put every request's figures in the JSON")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr")
    plot = p.add_subparsers(dest="benchmark_command", metavar="plot").add_parser(
        "plot", help="merge result JSON files into one table and plot",
        description="Merge `genserve benchmark --output-json` files (one system each) into one table and plot.")
    plot.add_argument("inputs", nargs="+", metavar="RESULT.json")
    plot.add_argument("--title", default="Output throughput against TTFT p90")
    _add_outputs(plot)
    return p


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    return BenchmarkConfig(
        url=args.url, label=args.label, wait_ready=args.wait_ready, slo_ttft=args.slo_ttft, slo_itl=args.slo_itl,
        workload=WorkloadConfig(input_tokens=args.input_tokens, output_tokens=args.output_tokens,
                                dataset=args.dataset, tokenizer=args.tokenizer, seed=args.seed),
        request=RequestConfig(api=args.api, model=args.model, ignore_eos=args.ignore_eos,
                              request_usage=args.request_usage, temperature=args.temperature,
                              extra_body=args.extra_body, request_timeout=args.request_timeout),
        load=LoadConfig(concurrency=args.concurrency, request_rates=args.request_rate, num_prompts=args.num_prompts,
                        warmup=args.warmup, seed=args.seed, progress=args.progress),
    )


def benchmark(config: BenchmarkConfig, tokenizer=None, save_requests: bool = False) -> dict:
    """Run the levels of `config` against its endpoint; the JSON document of the run."""
    from genserve.server.benchmark.report import run_to_dict
    from genserve.server.benchmark.runner import run_benchmark

    return run_to_dict(asyncio.run(run_benchmark(config, tokenizer)), save_requests)


def _plot(args: argparse.Namespace) -> int:
    from genserve.server.benchmark.report import load_runs, markdown, plot_png, write_outputs

    runs = load_runs(args.inputs)
    write_outputs(runs, args.output_json, args.output_md, None)
    if args.output_png:
        plot_png(runs, args.output_png, args.title)
    print(markdown(runs))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.benchmark_command == "plot":
            return _plot(args)
        from genserve.server.benchmark.report import markdown, write_outputs

        doc = benchmark(config_from_args(args), save_requests=args.save_requests)
        write_outputs([doc], args.output_json, args.output_md, args.output_png)
        print(markdown([doc]))
        if not any(lv["num_ok"] for lv in doc["levels"]):
            raise BenchmarkError("no request succeeded: " + "; ".join(
                f"{k}: {v}" for lv in doc["levels"][:1] for k, v in lv["error_samples"].items()))
    except (BenchmarkError, ValueError) as e:
        print(f"genserve benchmark: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("genserve benchmark: interrupted", file=sys.stderr)
        return 130
    return 0
