"""One streamed request per API kind (OpenAI completions / chat, TGI generate_stream) -> RequestResult."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from genserve.server.benchmark.config import API_PATHS, RequestConfig
from genserve.server.benchmark.workload import Prompt


@dataclass(slots=True)
class RequestResult:
    ok: bool
    sent_at: float  # seconds after the level started
    ttft: float | None = None
    itl: float | None = None  # mean gap between tokens after the first
    e2e: float | None = None
    output_tokens: int = 0
    token_count_source: str = "none"  # usage (OpenAI), details (TGI), events (one per streamed token)
    prompt_tokens: int | None = None  # as the server reported it
    num_events: int = 0
    finish_reason: str | None = None
    error: str | None = None  # an HTTP status ("422"), "connection", "timeout", "stream" or "no_tokens"
    error_message: str | None = None


def build_body(api: str, prompt: Prompt, rc: RequestConfig) -> dict:
    if api == "tgi":
        if prompt.text is None:
            raise ValueError("TGI's /generate_stream takes a text prompt, not chat messages: use --api chat")
        params = {"max_new_tokens": prompt.output_tokens, "details": True}
        if rc.temperature > 0:
            params.update(do_sample=True, temperature=rc.temperature)
        return {"inputs": prompt.text, "parameters": {**params, **rc.extra_body}, "stream": True}
    body: dict = {"max_tokens": prompt.output_tokens, "stream": True, "temperature": rc.temperature}
    if rc.model:
        body["model"] = rc.model
    if api == "chat":
        body["messages"] = prompt.messages or [{"role": "user", "content": prompt.text}]
    elif prompt.text is None:
        raise ValueError("chat messages need --api chat")
    else:
        body["prompt"] = prompt.text
    if rc.ignore_eos:
        body["ignore_eos"] = True
    if rc.request_usage:
        body["stream_options"] = {"include_usage": True}
    return {**body, **rc.extra_body}


def _error_message(raw: bytes) -> str:
    text = raw.decode(errors="replace")
    try:
        err = json.loads(text).get("error", text)
    except (json.JSONDecodeError, AttributeError):
        err = text
    if isinstance(err, dict):
        err = err.get("message", err)
    return str(err)[:300]


def connect_problem(error: BaseException) -> str:
    """The root cause of an httpx ConnectError, which itself only says "All connection attempts failed"."""
    seen = error
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(error)


class _Stream:
    """Folds the SSE payloads of one response into counts and token times."""

    def __init__(self, api: str):
        self.api = api
        self.token_times: list[float] = []
        self.num_events = 0
        self.usage_tokens: int | None = None
        self.detail_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None

    def feed(self, payload: dict, now: float) -> None:
        self.num_events += 1
        if payload.get("error"):
            self.error = _error_message(json.dumps(payload).encode())
            return
        if self.api == "tgi":
            if payload.get("token") is not None:
                self.token_times.append(now)
            details = payload.get("details") or {}
            if "generated_tokens" in details:
                self.detail_tokens = details["generated_tokens"]
                self.prompt_tokens = details.get("input_length")
                self.finish_reason = details.get("finish_reason")
            return
        usage = payload.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = usage["completion_tokens"]
            self.prompt_tokens = usage.get("prompt_tokens")
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") or {}
            if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
                self.token_times.append(now)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def count(self) -> tuple[int, str]:
        if self.usage_tokens is not None:
            return self.usage_tokens, "usage"
        if self.detail_tokens is not None:
            return self.detail_tokens, "details"
        return len(self.token_times), "events"


async def _stream(client: httpx.AsyncClient, url: str, api: str, body: dict, origin: float) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False, sent_at=start - origin)
    state = _Stream(api)
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            result.error = str(response.status_code)
            result.error_message = _error_message(await response.aread())
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                payload = json.loads(data)
            except json.JSONDecodeError:
                state.error = f"not JSON: {data[:100]}"
            else:
                state.feed(payload, time.perf_counter())
            if state.error:
                break
    end = time.perf_counter()
    result.output_tokens, result.token_count_source = state.count()
    result.prompt_tokens, result.num_events, result.finish_reason = state.prompt_tokens, state.num_events, state.finish_reason
    if state.error:
        result.error, result.error_message = "stream", state.error
        return result
    if not state.token_times or result.output_tokens < 1:
        result.error, result.error_message = "no_tokens", "the stream ended without a token"
        return result
    result.ok = True
    result.ttft = state.token_times[0] - start
    result.e2e = end - start
    if result.output_tokens > 1:
        result.itl = (state.token_times[-1] - state.token_times[0]) / (result.output_tokens - 1)
    return result


async def send_request(client: httpx.AsyncClient, base_url: str, prompt: Prompt, rc: RequestConfig,
                       origin: float) -> RequestResult:
    """Stream one request; every failure comes back as a result with `error` set, never as an exception."""
    sent_at = time.perf_counter() - origin
    body = build_body(rc.api, prompt, rc)
    try:
        return await asyncio.wait_for(_stream(client, base_url + API_PATHS[rc.api], rc.api, body, origin),
                                      rc.request_timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return RequestResult(ok=False, sent_at=sent_at, error="timeout",
                             error_message=f"no complete response within {rc.request_timeout:g} s")
    except httpx.HTTPError as e:
        message = connect_problem(e) if isinstance(e, httpx.ConnectError) else f"{type(e).__name__}: {e}"
        return RequestResult(ok=False, sent_at=sent_at, error="connection", error_message=message[:300])
