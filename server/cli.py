"""The `genserve` command: `serve` (TGI's launcher flags and env vars), `operator`, model preparation."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

from genserve.server import quant_methods
from genserve.server.cpu_env import configure_openmp_wait

ENGINE_HELP = {
    "model_id": "a local folder, a Hub id or a .gguf file; default: the built-in SmolLM2-135M-Instruct",
    "revision": "Hub revision (branch, tag or commit) of --model-id",
    "dtype": "float32, float16, bfloat16 or auto (on CPU: bfloat16 where it has AVX512-BF16 or AMX, else float32)",
    "device": "cpu, cuda, cuda:N or auto",
    "quantize": quant_methods.help_text(),
    "activation_quantization": "int8: with 4/8-bit grouped weights (GGUF, GPTQ, AWQ, --quantize int4*), round "
                               "activations to int8 for integer dot products on CPU, as llama.cpp does: ~2x "
                               "faster small-batch decode, outputs close to but not equal to float activations'",
    "num_shard": "tensor-parallel shards (GPUs)",
    "max_input_tokens": "longest prompt in tokens; default max_total_tokens - 1",
    "max_total_tokens": "prompt + generated tokens per request; default min(model context, 4096)",
    "max_stop_sequences": "most `stop` sequences per request",
    "max_best_of": "largest `best_of` (TGI) and `n` (OpenAI)",
    "max_top_n_tokens": "largest `top_n_tokens` / `top_logprobs`",
    "max_batch_prefill_tokens": "prompt tokens per prefill step",
    "max_batch_total_tokens": "tokens across the whole batch (KV-cache budget)",
    "max_batch_size": "requests per batch",
    "waiting_served_ratio": "waiting/running ratio that lets waiting requests join a running batch (TGI: 0.3; "
                            "0 here: chunked prefill rides in the decode step, so waiting only adds TTFT)",
    "max_waiting_tokens": "decode steps before waiting requests are forced into the batch",
    "block_size": "tokens per paged KV-cache block",
    "kv_cache_memory_fraction": "fraction of free device memory given to the KV cache",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "num_threads": "CPU threads for torch",
    "use_transformers_fallback": "run the model with transformers instead of genserve's own implementation",
    "trust_remote_code": "run the checkpoint's own Python code (`auto_map` in its config) through transformers",
    "disable_grammar_support": "reject `grammar` (TGI) and JSON `response_format` (OpenAI) with 422",
    "load_format": "auto or safetensors: read the weights; dummy: random weights, the model folder needs only "
                   "config.json and a tokenizer (benchmarks of a model's shape without its weights)",
    "speculate": "n-gram (prompt-lookup) draft tokens verified per decode step of greedy requests; 0 = off",
    "num_scheduler_steps": "greedy decode steps run back to back in one call (CPU fused decode of grouped 4/8-bit "
                           "weights; tokens stream in bursts of this many); 1 = off",
    "cuda_graphs": "decode batch sizes captured as CUDA graphs (steps padded up to the next one); 0 = off; "
                   "default 1,2,4,8,16,32 on CUDA, ignored without CUDA",
    "kv_cache_dtype": "fp8_e4m3fn or fp8_e5m2 (fp8 = e4m3): K/V stored in float8, 2-4x the tokens per byte; "
                      "decode then reads a widened copy (gather / varlen); default: the model dtype",
    "rope_scaling": "linear: scale rotary positions by --rope-factor (dynamic is refused: see docs/api.md)",
    "rope_factor": "rotary position scaling factor (alone: linear); the accepted context grows by it",
    "tokenizer_config_path": "a tokenizer_config.json whose chat_template replaces the model's",
    "lora_adapters": "LoRA adapters to serve: name=folder or Hub ids, comma-separated (PEFT format; docs/lora.md)",
    "max_loras": "LoRA adapters resident at once (a step holds at most this many); the rest load from disk, LRU",
    "max_lora_rank": "largest LoRA rank accepted",
    "enable_lora_runtime_updates": "serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's)",
}
ENGINE_ALIASES = {"max_input_tokens": ["--max-input-length"]}


def _env(name: str, default):
    return os.environ.get(name, default)


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _add_engine_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per EngineConfig field (TGI's names), each also read from its UPPER_CASE env var."""
    from genserve.server.config import EngineConfig

    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        env = f.name.upper()
        default = f.default
        kind = str(f.type)
        help_text = f"{ENGINE_HELP.get(f.name, f.name.replace('_', ' '))} [env: {env}]"
        names = [flag, *ENGINE_ALIASES.get(f.name, [])]
        if kind == "bool":
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=_bool(_env(env, default)), help=help_text)
            continue
        convert = int if kind.startswith("int") else float if kind.startswith("float") else str
        if f.name == "max_input_tokens" and env not in os.environ and "MAX_INPUT_LENGTH" in os.environ:
            env = "MAX_INPUT_LENGTH"
        group.add_argument(*names, dest=f.name, type=convert, default=_env(env, default), metavar=f.name.upper(),
                           help=help_text + (f" (default: {default})" if default is not None else ""))


def _metrics_compat(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = sorted(set(names) - {"tgi", "vllm"})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown metric name set {', '.join(unknown)} (choose from tgi, vllm)")
    return names


def _add_server_flags(group: argparse._ArgumentGroup) -> None:
    def add(flag: str, default, kind=str, help_text: str = "", env: str | None = ""):
        env = flag.lstrip("-").replace("-", "_").upper() if env == "" else env
        group.add_argument(flag, type=kind, default=_env(env, default) if env else default,
                           metavar=flag.lstrip("-").replace("-", "_").upper(),
                           help=help_text + (f" [env: {env}]" if env else "")
                           + (f" (default: {default})" if default is not None else ""))

    group.add_argument("-p", "--port", type=int, default=_env("PORT", 8080), metavar="PORT",
                       help="port to listen on [env: PORT] (default: 8080)")
    # TGI reads HOSTNAME, which shells and Kubernetes set to the machine's own name: see resolve_hostname
    add("--hostname", None, str, "address to bind (default: HOSTNAME when it is an IP address, else 0.0.0.0)",
        env=None)
    add("--max-concurrent-requests", 128, int, "requests in flight before new ones get 429 `overloaded`")
    add("--max-client-batch-size", 4, int, "most prompts in one /v1/completions request")
    add("--validation-workers", 2, int, "reported in /info (tokenisation runs on the event loop)")
    add("--payload-limit", 2_000_000, int, "largest request body in bytes (413 above)")
    add("--api-key", None, str, "require `Authorization: Bearer <key>` on POST routes (401 otherwise)")
    add("--cors-allow-origin", None, str, "comma-separated allowed CORS origins; default any")
    add("--graceful-termination-timeout", 90, int, "seconds to let in-flight requests finish after SIGTERM")
    add("--send-timeout", 60.0, float, "seconds a response may wait on a client that reads nothing (then aborted)")
    add("--request-header-timeout", 30.0, float, "seconds for a request's head to arrive (slowloris); then closed")
    add("--request-body-timeout", 30.0, float, "seconds a request body may stall between two chunks; then 408 "
        "and closed (0: no limit)")
    add("--max-consecutive-step-failures", 3, int, "engine steps failing in a row before the server exits 1")
    add("--huggingface-hub-cache", None, str, "where Hub downloads go (HF_HUB_CACHE)")
    add("--prometheus-port", None, int, "also serve /metrics on this port (TGI's separate metrics listener)")
    add("--metrics-compat", "tgi", _metrics_compat,
        "comma-separated metric name sets on /metrics: tgi (always) and vllm (vLLM's vllm:* names, for vLLM "
        "dashboards and the Gateway API inference extension's endpoint picker)")
    add("--otlp-endpoint", None, str, "send OpenTelemetry traces (OTLP over HTTP) to this collector URL")
    add("--otlp-service-name", "genserve", str, "service.name of the traces")
    group.add_argument("--json-output", action=argparse.BooleanOptionalAction, default=_bool(_env("JSON_OUTPUT", False)),
                       help="one JSON object per log line, one line per request with its timings [env: JSON_OUTPUT]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve",
        description="Serve large language models with TGI's and OpenAI's HTTP APIs.",
        epilog="Run `genserve serve --help` for the server's flags; each flag also reads its UPPER_CASE env var.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="serve a model over HTTP (TGI + OpenAI APIs)",
        description="Load a model and serve it: TGI's /generate, /generate_stream, /info, /health, /metrics "
                    "and OpenAI's /v1/chat/completions, /v1/completions, /v1/models.",
    )
    _add_engine_flags(serve.add_argument_group("model and engine"))
    _add_server_flags(serve.add_argument_group("HTTP server"))
    from genserve.server.launcher_flags import add_launcher_flags

    add_launcher_flags(serve.add_argument_group("TGI launcher compatibility"))
    operator = sub.add_parser("operator", help="run the Kubernetes operator (kopf run -m genserve.operator.main ...)",
                              add_help=False)
    operator.add_argument("kopf_args", nargs=argparse.REMAINDER, help="passed on to `kopf run`")
    sub.add_parser("prepare-default-model", help="convert the built-in SmolLM2 model once into the cache")
    download = sub.add_parser("download", help="download (or convert) a model into the cache and exit")
    download.add_argument("--model-id", default=None)
    download.add_argument("--revision", default=None)
    from genserve.server.benchmark.command import add_parser as add_benchmark_parser

    add_benchmark_parser(sub)
    from genserve.server.convert_checkpoint import add_parser as add_convert_parser

    add_convert_parser(sub)
    return parser


def server_settings(args: argparse.Namespace):
    from genserve.server.api.settings import ServerSettings

    origins = [o.strip() for o in (args.cors_allow_origin or "").split(",") if o.strip()]
    from genserve.server.launcher_flags import resolve_hostname

    return ServerSettings(
        hostname=resolve_hostname(args.hostname),
        port=args.port,
        max_concurrent_requests=args.max_concurrent_requests,
        max_client_batch_size=args.max_client_batch_size,
        validation_workers=args.validation_workers,
        payload_limit=args.payload_limit,
        api_key=args.api_key or None,
        cors_allow_origin=origins,
        graceful_termination_timeout=args.graceful_termination_timeout,
        metrics_compat=args.metrics_compat,
        send_timeout=args.send_timeout,
        request_header_timeout=args.request_header_timeout,
        request_body_timeout=args.request_body_timeout,
        json_output=args.json_output,
        sha=os.environ.get("GENSERVE_GIT_SHA"),
        docker_label=os.environ.get("DOCKER_LABEL"),
        exit_on_engine_failure=True,
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from genserve.server.api.app import create_app
    from genserve.server.config import EngineConfig
    from genserve.server.logging_setup import configure_logging

    configure_logging(args.json_output)
    from genserve.server.launcher_flags import apply_launcher_flags

    try:
        apply_launcher_flags(args)
    except ValueError as exc:
        raise SystemExit(f"genserve serve: error: {exc}") from None
    if args.huggingface_hub_cache:
        os.environ["HF_HUB_CACHE"] = args.huggingface_hub_cache
    from genserve.server.async_engine import AsyncEngine

    try:
        config = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    except ValueError as exc:
        raise SystemExit(f"genserve serve: error: {exc}") from None
    settings = server_settings(args)
    try:
        engine = AsyncEngine.from_config(config)
    except ValueError as exc:  # a flag the model or machine cannot honour: one line, not a traceback
        raise SystemExit(f"genserve serve: error: {exc}") from None
    engine.max_consecutive_step_failures = args.max_consecutive_step_failures
    app = create_app(engine, settings)
    if args.prometheus_port:
        from genserve.server.metrics import serve_metrics

        serve_metrics(app.state.metrics, settings.hostname, args.prometheus_port)
    if args.otlp_endpoint:
        from genserve.server.tracing import configure_tracing

        configure_tracing(args.otlp_endpoint, args.otlp_service_name)
    logging.getLogger(__name__).info("serving %s on http://%s:%d", engine.model_id, settings.hostname, settings.port)
    # SIGTERM drains (see genserve.server.shutdown), then uvicorn re-raises it: exit 0 after the drain
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from genserve.server.api.slow_clients import header_timeout_protocol
    from genserve.server.shutdown import GenserveServer

    uv_config = uvicorn.Config(app, host=settings.hostname, port=settings.port, log_config=None, access_log=False,
                            http=header_timeout_protocol(settings.request_header_timeout),
                            timeout_graceful_shutdown=1)
    server = GenserveServer(uv_config, app, settings.graceful_termination_timeout)
    server.run()
    return server.exit_code


def run_operator(args: list[str]) -> int:
    argv = [sys.executable, "-m", "kopf", "run", "-m", "genserve.operator.main", *args]
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    configure_openmp_wait()  # before anything imports torch
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:
        return run_operator(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "benchmark":
        from genserve.server.benchmark.command import run as run_benchmark

        return run_benchmark(args)
    if args.command == "convert":
        from genserve.server.convert_checkpoint import run as run_convert

        return run_convert(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from genserve.server.model_files import prepare_default_model, resolve_model

    if args.command == "prepare-default-model":
        print(prepare_default_model())
    elif args.command == "download":
        print(resolve_model(args.model_id, args.revision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
