"""`genserve` command line: TGI flag names, env vars, help text, the operator passthrough."""

from __future__ import annotations

import dataclasses

import pytest

from genserve.server import cli
from genserve.server.config import EngineConfig


def test_serve_defaults(monkeypatch):
    for var in ("PORT", "MODEL_ID", "MAX_CONCURRENT_REQUESTS", "JSON_OUTPUT", "API_KEY", "HOSTNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOSTNAME", "pod-abc")  # exported by shells and Kubernetes; must not be the bind address
    args = cli.build_parser().parse_args(["serve"])
    assert args.port == 8080 and args.model_id is None
    assert args.max_concurrent_requests == 128 and args.payload_limit == 2_000_000
    assert args.graceful_termination_timeout == 90 and args.json_output is False
    settings = cli.server_settings(args)
    assert settings.hostname == "0.0.0.0"
    assert settings.max_concurrent_requests == 128 and settings.api_key is None and settings.cors_allow_origin == []
    config = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    assert config == EngineConfig()


def test_env_vars_and_flags(monkeypatch):
    monkeypatch.setenv("PORT", "80")
    monkeypatch.setenv("MODEL_ID", "org/model")
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "2048")
    monkeypatch.setenv("MAX_INPUT_LENGTH", "1000")
    monkeypatch.setenv("JSON_OUTPUT", "true")
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", "https://a.example, https://b.example")
    monkeypatch.setenv("ENABLE_PREFIX_CACHING", "false")
    args = cli.build_parser().parse_args(["serve", "--max-concurrent-requests", "7", "--max-best-of", "4",
                                          "--block-size", "32", "--device", "cpu", "--max-waiting-tokens", "5",
                                          "--max-batch-size", "8", "--huggingface-hub-cache", "/tmp/hub"])
    assert args.port == 80 and args.model_id == "org/model" and args.max_total_tokens == 2048
    assert args.max_input_tokens == 1000 and args.json_output is True and args.enable_prefix_caching is False
    assert args.max_concurrent_requests == 7 and args.max_best_of == 4 and args.block_size == 32
    assert args.device == "cpu" and args.max_waiting_tokens == 5 and args.max_batch_size == 8
    assert args.huggingface_hub_cache == "/tmp/hub"
    assert cli.server_settings(args).cors_allow_origin == ["https://a.example", "https://b.example"]


def test_help_lists_tgi_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model-id", "--revision", "--port", "--hostname", "--num-shard", "--dtype", "--quantize",
                 "--max-concurrent-requests", "--max-input-tokens", "--max-total-tokens", "--max-batch-prefill-tokens",
                 "--max-batch-total-tokens", "--max-batch-size", "--waiting-served-ratio", "--max-stop-sequences",
                 "--max-best-of", "--max-top-n-tokens", "--api-key", "--cors-allow-origin", "--payload-limit",
                 "--graceful-termination-timeout", "--json-output", "--max-waiting-tokens", "--block-size",
                 "--device", "--huggingface-hub-cache"):
        assert flag in out, flag
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "serve" in capsys.readouterr().out


def test_operator_execs_kopf(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls.append((path, argv)))
    cli.main(["operator", "--namespace", "llm", "--verbose"])
    path, argv = calls[0]
    assert argv[1:] == ["-m", "kopf", "run", "-m", "genserve.operator.main", "--namespace", "llm", "--verbose"]
