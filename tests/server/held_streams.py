"""Streamed completions held open until closed: a queue that stays put while a test looks at it."""

from __future__ import annotations

import threading

import httpx


class HeldStreams:
    """Each `add()` opens one streamed /v1/completions (ignore_eos, 400 tokens) read in a thread of its own;
    `close()` disconnects them all, so the server aborts those requests."""

    def __init__(self, base_url: str, n: int = 0):
        self.base_url = base_url
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.responses: list[httpx.Response] = []
        for _ in range(n):
            self.add()

    def add(self) -> None:
        thread = threading.Thread(target=self._one, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _one(self) -> None:
        body = {"model": "m", "prompt": "The lighthouse keeper said", "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.stream("POST", self.base_url + "/v1/completions", json=body, timeout=300) as response:
                self.responses.append(response)
                for _ in response.iter_lines():
                    if self.stop.is_set():
                        return
        except Exception:  # noqa: BLE001 (close() shuts streams under the reader's feet)
            pass

    def close(self) -> None:
        self.stop.set()
        for response in list(self.responses):
            response.close()
        for thread in self.threads:
            thread.join(timeout=30)
