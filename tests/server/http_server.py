"""Start `genserve serve` as a real process for the HTTP tests, and the transformers greedy reference."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
# small KV cache and limits: fast start on a CPU box
BASE_ARGS = ["--hostname", "127.0.0.1", "--max-total-tokens", "1024", "--max-batch-total-tokens", "16384",
             "--dtype", "float32", "--device", "cpu"]


def require_engine() -> None:
    pytest.importorskip("genserve.server.async_engine", reason="the engine (genserve.server.async_engine) is not built yet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(log_dir: Path, *extra: str, env: dict | None = None, ready_timeout: float = 240) -> Server:
    require_engine()
    port = free_port()
    log_path = log_dir / f"serve-{port}.log"
    genserve = Path(sys.executable).parent / "genserve"
    cmd = [str(genserve), "serve", "--port", str(port), *BASE_ARGS, *extra]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"genserve serve exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server not healthy after {ready_timeout} s:\n{server.log()[-4000:]}")
        time.sleep(0.5)


@functools.lru_cache(maxsize=1)
def _reference_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from genserve.server.model_files import prepare_default_model

    folder = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = {tokenizer.eos_token_id}
    gen_eos = GenerationConfig.from_pretrained(folder).eos_token_id
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return tokenizer, model, eos


def reference_tokenizer():
    return _reference_model()[0]


def greedy_reference(prompt_ids: list[int], max_new_tokens: int) -> tuple[str, list[int]]:
    """transformers' greedy `generate` on the same ids; text stops before the first EOS token."""
    import torch

    tokenizer, model, eos = _reference_model()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=sorted(eos), pad_token_id=tokenizer.eos_token_id)
    new = out[0, len(prompt_ids):].tolist()
    for i, t in enumerate(new):
        if t in eos:
            new = new[: i + 1]
            break
    text_ids = [t for t in new if t not in eos]
    return tokenizer.decode(text_ids, skip_special_tokens=True), new


def prompt_logprob_reference(prompt_ids: list[int]) -> list[float | None]:
    """transformers' log-probability of each prompt token given the ones before it (None for the first)."""
    import torch

    _, model, _ = _reference_model()
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt_ids])).logits[0].float().log_softmax(-1)
    return [None] + logprobs[:-1].gather(1, torch.tensor(prompt_ids[1:])[:, None]).squeeze(1).tolist()


def chat_ids(messages: list[dict]) -> list[int]:
    tok = reference_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def text_ids(text: str) -> list[int]:
    return reference_tokenizer()(text)["input_ids"]
