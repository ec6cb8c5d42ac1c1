"""TGI launcher flags beyond the engine and HTTP settings: each honoured, or refused at startup in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch
from test_engine import make_engine
from transformers import AutoConfig, AutoModelForCausalLM

from genserve.server import cli, launcher_flags
from genserve.server.launcher_flags import REFUSED, resolve_hostname, resolve_num_shard
from genserve.server.metrics import Metrics, serve_metrics
from genserve.server.model_overrides import apply_rope_flags
from genserve.server.sampling_params import SamplingParams


def _serve_args(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def _run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genserve.server.cli", "serve", *argv], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("refused", REFUSED, ids=lambda r: r.flag)
def test_refused_flags_stop_startup_with_one_line(refused):
    argv = [refused.flag] if not refused.takes_value else [refused.flag, "x"]
    with pytest.raises(ValueError, match=f"`{refused.flag}` is not supported: "):
        launcher_flags.apply_launcher_flags(_serve_args(*argv))


def test_refused_flag_from_its_env_var_through_the_real_command():
    done = _run_cli("--model-id", "/nonexistent", env={"NGROK_EDGE": "edge"})
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == ("genserve serve: error: `--ngrok-edge` is not supported: ngrok tunnelling is not built "
                         "in; put the server behind your own ingress")
    assert "Traceback" not in done.stderr


def test_rope_flags_refused_in_one_line_by_the_real_command():
    done = _run_cli("--rope-scaling", "dynamic", "--rope-factor", "2")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("genserve serve: error: `--rope-scaling dynamic` is not")
    done = _run_cli("--rope-factor", "0.5")
    assert done.stderr.strip().splitlines()[-1] == "genserve serve: error: `--rope-factor` must be a number >= 1; got 0.5"


def test_sharded_and_num_shard():
    assert resolve_num_shard(False, 1) == 1 and resolve_num_shard(True, 4) == 4
    with pytest.raises(ValueError, match="contradicts `--num-shard 2`"):
        resolve_num_shard(False, 2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs at least 2 GPUs or an explicit `--num-shard N`"):
            resolve_num_shard(True, 1)
    args = _serve_args("--sharded", "true", "--num-shard", "2")
    launcher_flags.apply_launcher_flags(args)
    assert args.num_shard == 2
    with pytest.raises(SystemExit):
        _serve_args("--sharded", "maybe")


def test_env_master_and_kernel_flags(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "GENSERVE_CPU_KERNELS", "HF_HUB_CACHE"):
        # set first so monkeypatch restores the original at teardown: apply_launcher_flags writes os.environ,
        # and a leaked MASTER_ADDR would send every later tensor-parallel test to a rendezvous that never comes
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)
    args = _serve_args("--master-addr", "10.0.0.7", "--master-port", "29501", "--disable-custom-kernels",
                       "--weights-cache-override", "/tmp/weights", "--usage-stats", "off")
    launcher_flags.apply_launcher_flags(args)
    assert os.environ["MASTER_ADDR"] == "10.0.0.7" and os.environ["MASTER_PORT"] == "29501"
    assert os.environ["GENSERVE_CPU_KERNELS"] == "0"  # every native kernel loader reads it
    assert args.huggingface_hub_cache == "/tmp/weights"
    with pytest.raises(SystemExit):
        _serve_args("--usage-stats", "sometimes")


def test_env_report(capsys):
    args = _serve_args("-e")
    launcher_flags.apply_launcher_flags(args)
    out = capsys.readouterr().out
    for key in ("genserve:", "python:", "torch:", "transformers:", "cpu:", "gpus:"):
        assert key in out


def test_hostname_from_tgi_env_var(monkeypatch):
    monkeypatch.setenv("HOSTNAME", "127.0.0.1")
    assert resolve_hostname(None) == "127.0.0.1"
    assert resolve_hostname("::") == "::"
    monkeypatch.setenv("HOSTNAME", "my-pod-7d9f")  # a name, as shells and Kubernetes set it
    assert resolve_hostname(None) == "0.0.0.0"
    monkeypatch.delenv("HOSTNAME")
    assert resolve_hostname(None) == "0.0.0.0"
    args = _serve_args("-p", "9999")
    assert args.port == 9999


def test_prometheus_port_serves_the_same_exposition():
    metrics = Metrics()
    metrics.inc("tgi_request_count")
    from genserve.server.distributed import free_port

    port = free_port()
    serve_metrics(metrics, "127.0.0.1", port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        body = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/plain")
    assert "tgi_request_count 1" in body.splitlines()
    assert body.split("\n# HELP tgi_request_count")[0] == metrics.render().decode().split("\n# HELP tgi_request_count")[0]


def test_linear_rope_factor_matches_transformers(smollm2_dir):
    """--rope-factor 2: greedy ids equal transformers with the same linear scaling, and the context doubles."""
    engine = make_engine(smollm2_dir, rope_factor=2.0, max_total_tokens=4096, max_input_tokens=4000)
    reference_config = AutoConfig.from_pretrained(smollm2_dir)
    original = reference_config.max_position_embeddings
    apply_rope_flags(reference_config, None, 2.0)
    assert engine.hf_config.max_position_embeddings == reference_config.max_position_embeddings == 2 * original
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, config=reference_config, dtype=torch.float32)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ids = [engine.tokenizer.encode(p) for p in prompts]
    params = SamplingParams(max_new_tokens=10)
    request_ids = [engine.add_request(p, params) for p in ids]
    got = {r: [] for r in request_ids}
    while engine.has_unfinished:
        for output in engine.step()[0]:
            got[output.request_id].extend(t.id for t in output.new_tokens)
    for prompt_ids, request_id in zip(ids, request_ids, strict=True):
        expected = model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False)[0, len(prompt_ids):]
        assert got[request_id] == expected.tolist()
    # unscaled decoding differs: the flag really changed the positions
    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    unscaled = [plain.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist() for p in ids]
    assert unscaled != [got[r] for r in request_ids]


def test_rope_flags_refuse_replacing_a_checkpoints_own_scaling():
    config = AutoConfig.for_model("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1,
                                                         "high_freq_factor": 4, "original_max_position_embeddings": 8})
    with pytest.raises(ValueError, match="would replace the checkpoint's own 'llama3' rope scaling"):
        apply_rope_flags(config, "linear", 2.0)


def test_tokenizer_config_path_replaces_the_chat_template(smollm2_dir, tmp_path):
    template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}<<assistant>>"
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": template, "model_max_length": 10}))
    engine = make_engine(smollm2_dir, tokenizer_config_path=str(path))
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<<user>>hi<<assistant>>"
    for bad, message in ((tmp_path / "missing.json", "no file at"), (tmp_path / "bad.json", "is not a JSON file")):
        if bad.name == "bad.json":
            bad.write_text("{not json")
        with pytest.raises(ValueError, match=message):
            make_engine(smollm2_dir, tokenizer_config_path=str(bad))


def test_rope_factor_reaches_the_transformers_fallback(smollm2_dir):
    """The fallback builds its transformers model from the engine's config, overrides included."""
    engine = make_engine(smollm2_dir, rope_factor=2.0, use_transformers_fallback=True, max_total_tokens=4096,
                         max_input_tokens=4000)
    rope = engine.runner.model.config.rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0
