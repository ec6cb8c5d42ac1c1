"""Shared by the reliability and security tests: a tiny random Llama, SSE and /metrics readers, RSS."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

# a long context so a stream can run for thousands of tokens (the never-reading client fills its socket)
TINY_MAX_POSITIONS = 4096


def save_tiny_model(path: Path, tokenizer_dir: Path, max_positions: int = TINY_MAX_POSITIONS) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer (and chat template): starts in seconds."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, initializer_range=0.3,
        tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return Path(path)


def metrics(base_url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base_url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_for(predicate, what, cap: float = 120.0, interval: float = 0.05):
    """Poll `predicate()` until it returns something truthy; a generous cap for a busy machine. `what` may be
    a callable, to describe the last state seen when the cap is reached."""
    deadline = time.monotonic() + cap
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {cap} s waiting for {what() if callable(what) else what}"
        time.sleep(interval)


def idle(base_url: str) -> dict[str, float] | None:
    m = metrics(base_url)
    quiet = (m["tgi_batch_current_size"] == 0 and m["tgi_queue_size"] == 0
             and m["genserve_kv_cache_blocks_used"] == 0)
    return m if quiet else None


def sse_events(lines) -> list[dict]:
    return [json.loads(line[5:]) for line in lines if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def peak_rss_bytes(pid: int) -> int:
    """The process's high-water resident set (VmHWM): the peak since it started."""
    return _status_kib(pid, "VmHWM") * 1024


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class StreamInThread:
    """A /generate_stream (or other SSE route) read on a thread: `first` is set at the first event."""

    def __init__(self, base_url: str, body: dict, route: str = "/generate_stream", headers: dict | None = None):
        import threading

        self.first = threading.Event()
        self.status: int | None = None
        self.events: list[dict] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(base_url, route, body, headers or {}), daemon=True)
        self.thread.start()

    def _run(self, base_url: str, route: str, body: dict, headers: dict) -> None:
        try:
            with httpx.Client(base_url=base_url, headers=headers, timeout=300) as client, \
                    client.stream("POST", route, json=body) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        self.events.append(json.loads(line[5:]))
                        self.first.set()
        except BaseException as e:  # noqa: B036 - the test reads it
            self.error = e
        finally:
            self.first.set()

    def join(self, cap: float = 300) -> StreamInThread:
        self.thread.join(cap)
        assert not self.thread.is_alive(), "the stream never ended"
        return self


def generated_ids(events: list[dict]) -> list[int]:
    return [e["token"]["id"] for e in events if "token" in e]


# ---- one hardened server shared by test_reliability_load.py and test_security.py (a start costs tens of s)

KEY = "s3cr3t-Key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example.com"
LIMIT = 4  # --max-concurrent-requests
SEND_TIMEOUT = 3
BODY_TIMEOUT = 3
TRAPS = {  # chat-template branches that reach outside the sandbox, run when the first message names them
    "read-attributes": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "read-globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "read-file": "{% include '/etc/passwd' %}",
    "format-escape": "{{ '{0.__class__.__mro__}'.format(messages) }}",
}


@pytest.fixture(scope="session")
def hardened_server(tmp_path_factory, smollm2_dir):
    """A tiny Llama behind --api-key, one CORS origin, a trapped chat template, a low concurrency limit,
    short send, header and body timeouts, and room for long streams (--max-total-tokens 4096)."""
    from http_server import start_server
    from transformers import AutoTokenizer

    tiny = save_tiny_model(tmp_path_factory.mktemp("tiny-hardened"), smollm2_dir)
    template = AutoTokenizer.from_pretrained(tiny).chat_template
    traps = "".join(("{%- if" if i == 0 else "{%- elif") + f" messages[0]['content'] == '{name}' -%}}" + body
                    for i, (name, body) in enumerate(TRAPS.items()))
    config = tmp_path_factory.mktemp("hostile-template") / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": traps + "{%- else -%}" + template + "{%- endif -%}"}))
    srv = start_server(tmp_path_factory.mktemp("serve-hardened"), "--model-id", str(tiny),
                       "--api-key", KEY, "--cors-allow-origin", ORIGIN, "--tokenizer-config-path", str(config),
                       "--max-concurrent-requests", str(LIMIT), "--max-batch-size", "2",
                       "--max-total-tokens", "4096", "--max-batch-total-tokens", "65536", "--max-top-n-tokens", "100",
                       "--send-timeout", str(SEND_TIMEOUT), "--request-header-timeout", "3",
                       "--request-body-timeout", str(BODY_TIMEOUT), "--num-threads", "1")
    srv.model_dir = tiny
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
