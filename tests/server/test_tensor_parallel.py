"""Tensor parallelism end to end: sharded engines give the same greedy tokens as one process and as
transformers (SmolLM2 over HTTP at --num-shard 3, a tiny Llama with KV-head replication at 2), bad
shard counts are refused before anything starts, and a dead worker takes the server down."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from model_helpers import save_tiny_llama
from reliability_helpers import StreamInThread
from transformers import AutoModelForCausalLM, AutoTokenizer

from genserve.server import distributed
from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
MAX_NEW = 8


def reference_greedy(model_dir, prompts_ids, max_new=MAX_NEW):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return [model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids):].tolist()
            for ids in prompts_ids]


def make_engine(model_dir, **overrides) -> LLMEngine:
    settings = dict(model_id=str(model_dir), dtype="float32", max_total_tokens=256, max_input_tokens=200,
                    max_batch_total_tokens=4096, waiting_served_ratio=0.0)
    return LLMEngine(EngineConfig(**{**settings, **overrides}))


def run_staggered(engine, prompts_ids, max_new=MAX_NEW):
    """Half the requests first, the rest after two steps: decodes and prefills share a step."""
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts_ids[:2]]
    tokens: dict[str, list[int]] = {}
    for step in range(10_000):
        if step == 2:
            ids += [engine.add_request(p, params) for p in prompts_ids[2:]]
        if step > 2 and not engine.has_unfinished:
            break
        for o in engine.step()[0]:
            tokens.setdefault(o.request_id, []).extend(t.id for t in o.new_tokens)
    return [tokens[i] for i in ids]


@pytest.fixture(scope="module")
def tiny_kv1_dir(tmp_path_factory, smollm2_dir):
    """4 query heads, 1 KV head: at --num-shard 2 each rank holds a copy of the KV head."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-kv1"), smollm2_dir, num_kv_heads=1)


@pytest.fixture(scope="module")
def tiny_prompts(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tok.encode(p) for p in PROMPTS]


def test_shard_counts_that_do_not_divide_the_heads_are_refused_before_spawning(smollm2_dir, tiny_kv1_dir):
    with pytest.raises(ValueError, match=r"--num-shard 2 does not divide the model's 9 attention heads"):
        make_engine(smollm2_dir, num_shard=2)
    with pytest.raises(ValueError, match=r"--num-shard 3 does not divide the model's 4 attention heads"):
        make_engine(tiny_kv1_dir, num_shard=3)
    assert not multiprocessing.active_children()
    assert not distributed.is_distributed()
    config = SimpleNamespace(num_attention_heads=12, num_key_value_heads=8, intermediate_size=96)
    with pytest.raises(ValueError, match="8 KV heads: one must divide the other"):
        distributed.check_shardable(config, 3)
    distributed.check_shardable(SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, intermediate_size=96), 4)


def test_launch_from_torchrun_variables_or_self_spawn():
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="10.0.0.5", MASTER_PORT="29400")
    assert distributed.resolve_launch(2, env) == distributed.Launch(1, 2, 1, "10.0.0.5", 29400, True)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but --num-shard 4"):
        distributed.resolve_launch(4, env)
    spawn = distributed.resolve_launch(3, {"MASTER_PORT": "29411"})
    assert spawn == distributed.Launch(0, 3, 0, "127.0.0.1", 29411, False)


def test_collective_set_up_times_out_with_a_clear_error():
    # in a subprocess: a failed init_process_group leaves torch's group counter bumped in this one
    script = ("import torch; from genserve.server import distributed as d; "
              "d.init_process_group(d.Launch(0, 2, 0, '127.0.0.1', d.free_port(), False), torch.device('cpu'), 1)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert re.search(r"RuntimeError: tensor-parallel set-up failed for rank 0 of 2 \(gloo at tcp://127.0.0.1:\d+, "
                     r"timeout 1 s; set GENSERVE_TP_INIT_TIMEOUT to change it\)", result.stderr), result.stderr


def test_tiny_llama_two_shards_with_replicated_kv_head_matches_one_shard_and_transformers(tiny_kv1_dir,
                                                                                         tiny_prompts):
    reference = reference_greedy(tiny_kv1_dir, tiny_prompts)
    single = make_engine(tiny_kv1_dir)
    assert run_staggered(single, tiny_prompts) == reference
    engine = make_engine(tiny_kv1_dir, num_shard=2)
    try:
        assert distributed.get_tp_size() == 2
        attn = engine.runner.attention_layers[0]
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
        assert engine.runner.num_blocks == single.runner.num_blocks
        assert run_staggered(engine, tiny_prompts) == reference
        assert engine.kv_cache.num_used_blocks == 0
    finally:
        engine.shutdown()
    assert not distributed.is_distributed()
    assert not multiprocessing.active_children()


RANK_SCRIPT = """
import json, sys
from genserve.server.config import EngineConfig
from genserve.server.engine import LLMEngine
from genserve.server.sampling_params import SamplingParams
engine = LLMEngine(EngineConfig(model_id=sys.argv[1], dtype="float32", max_total_tokens=256,
                                max_batch_total_tokens=4096, num_shard=2))
print(json.dumps(engine.generate(json.loads(sys.argv[2]), SamplingParams(max_new_tokens=8))), flush=True)
engine.shutdown()
"""


def test_torchrun_style_launch_one_process_per_rank(tiny_kv1_dir, tiny_prompts):
    """RANK/WORLD_SIZE/MASTER_* set: nothing is spawned; rank 1 serves steps until rank 0 shuts down."""
    port = str(distributed.free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "GENSERVE_TP_INIT_TIMEOUT": "60"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tiny_kv1_dir), json.dumps(tiny_prompts)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert json.loads(results[0][0].strip().splitlines()[-1]) == reference_greedy(tiny_kv1_dir, tiny_prompts)


def start_server(tmp_path: Path, model_dir, num_shard: int, device: str = "cpu",
                 *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = distributed.free_port()
    log_path = tmp_path / f"serve-{port}.log"
    cmd = [str(Path(sys.executable).parent / "genserve"), "serve", "--model-id", str(model_dir), "--port", str(port),
           "--hostname", "127.0.0.1", "--num-shard", str(num_shard), "--dtype", "float32", "--device", device,
           "--max-total-tokens", "512", "--max-batch-total-tokens", "4096", *extra]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"genserve serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"server not healthy after 180 s:\n{log_path.read_text()[-4000:]}")


def generate_concurrently(url: str, prompts: list[str], max_new: int = MAX_NEW) -> list[list[int]]:
    def one(prompt: str) -> list[int]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new, "details": True}}
        response = httpx.post(url + "/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["details"]["tokens"]]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def worker_pids(log_path: Path) -> list[int]:
    return [int(p) for p in re.findall(r"started tensor-parallel worker rank \d+ \(pid (\d+)\)", log_path.read_text())]


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_smollm2_three_shards_over_http_match_one_shard_and_transformers_then_worker_death_exits(
        tmp_path, smollm2_dir):
    proc, url, log_path = start_server(tmp_path, smollm2_dir, num_shard=3)
    try:
        sharded = generate_concurrently(url, PROMPTS)
        pids = worker_pids(log_path)
        assert len(pids) == 2 and all(is_running(p) for p in pids)
        tok = AutoTokenizer.from_pretrained(smollm2_dir)
        prompts_ids = [tok.encode(p) for p in PROMPTS]
        single = make_engine(smollm2_dir).generate(prompts_ids, SamplingParams(max_new_tokens=MAX_NEW))
        assert sharded == single
        assert sharded == [ref[:len(s)] for ref, s in zip(reference_greedy(smollm2_dir, prompts_ids), sharded,
                                                           strict=True)]

        # killed mid-stream: the server ends (non-zero) and so does the stream, never a hang
        stream = StreamInThread(url, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 400}})
        assert stream.first.wait(300) and stream.error is None
        os.kill(pids[0], signal.SIGKILL)
        returncode = proc.wait(timeout=120)  # a cap only: rank 0's death ends the launcher
        assert returncode != 0
        stream.join()
        assert not any(e.get("generated_text") for e in stream.events)
        deadline = time.monotonic() + 120
        while is_running(pids[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_running(pids[1]), "the surviving worker outlived rank 0"
        # whichever sees it first: the supervisor (the worker's exit code) or rank 0's next collective
        log = log_path.read_text()
        assert ("exited with code -9: exiting" in log or "tensor-parallel step failed on rank 0: exiting" in log
                or "engine step failed" in log), log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_json_output_and_prompt_logprobs_across_worker_ranks(tmp_path, tiny_kv1_dir):
    proc, url, log_path = start_server(tmp_path, tiny_kv1_dir, 2, "cpu", "--json-output")
    try:
        assert len(generate_concurrently(url, PROMPTS[:2], max_new=4)) == 2
        # prompt log-probabilities need the vocab-parallel lm_head on every rank: same as one shard
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 1, "details": True,
                                                     "decoder_input_details": True}}
        prefill = httpx.post(url + "/generate", json=body, timeout=60).json()["details"]["prefill"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    # every line, rank 0's and the worker's alike, is one JSON object; the worker's carry its rank
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert any(e.get("rank") == 1 and "rank 1 ready" in e["message"] for e in lines)
    single = make_engine(tiny_kv1_dir)
    request_id = single.add_request([p["id"] for p in prefill],
                                    SamplingParams(max_new_tokens=1, prompt_logprobs=True))
    expected = next(o for o in single.step()[0] if o.request_id == request_id).prompt_logprobs
    assert expected[0] is None and prefill[0]["logprob"] is None
    assert all(abs(p["logprob"] - e) < 1e-4 for p, e in zip(prefill[1:], expected[1:], strict=True))
    assert any("rank" not in e and e["target"].startswith("genserve") for e in lines)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL tensor parallelism needs 2 GPUs")
def test_nccl_two_shards_match_one_shard_on_cuda(tiny_kv1_dir, tiny_prompts, smollm2_dir):
    single = make_engine(tiny_kv1_dir, device="cuda")
    expected = run_staggered(single, tiny_prompts)
    del single
    engine = make_engine(tiny_kv1_dir, device="cuda", num_shard=2)
    try:
        assert engine.runner.device == torch.device("cuda", 0)
        assert run_staggered(engine, tiny_prompts) == expected
    finally:
        engine.shutdown()
