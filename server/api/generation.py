"""What every route shares: tokenise, admit (429), validate (422), run the engine, time and count.

The routes only translate between their wire format and `SamplingParams` / `SequenceResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydantic import BaseModel

from genserve.server.api.disconnect import ClientDisconnected
from genserve.server.api.errors import APIError, generation_error, overloaded, validation_error
from genserve.server.api.protocol import unknown_fields
from genserve.server.api.settings import ServerSettings
from genserve.server.metrics import Metrics
from genserve.server.outputs import RequestOutput, TokenInfo, TopToken
from genserve.server.sampling_params import SamplingParams

logger = logging.getLogger("genserve.request")

SEED_MODULUS = 2**64
INLINE_TOKENIZE_CHARS = 4096


def new_request_id() -> str:
    return uuid.uuid4().hex


def warn_unknown_fields(route: str, body: BaseModel, request_id: str | None = None) -> None:
    """One warning line naming the fields the body carried that genserve ignores (as vLLM does)."""
    names = unknown_fields(body)
    if names:
        logger.warning("%s: ignoring unknown fields: %s", route, ", ".join(names),
                       extra={"request_id": request_id, "fields": {"ignored_fields": names}})


@dataclass(slots=True)
class SequenceResult:
    """One finished sequence, as the engine reported it."""

    tokens: list[TokenInfo]
    text: str  # stop sequence cut off
    finish_reason: str
    matched_stop: str | None
    num_prompt_tokens: int
    num_generated_tokens: int
    seed: int | None
    queue_s: float = 0.0
    prompt_logprobs: list[float | None] | None = None  # when the params asked for them
    prompt_top_tokens: list[list[TopToken]] | None = None

    @property
    def mean_logprob(self) -> float:
        return sum(t.logprob for t in self.tokens) / len(self.tokens) if self.tokens else float("-inf")


@dataclass
class RequestRecord:
    """Timings and counts of one HTTP request: headers, metrics and the JSON log line come from it."""

    request_id: str
    route: str
    start: float = field(default_factory=time.perf_counter)
    validated: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    end: float | None = None
    queue_s: float = 0.0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    max_new_tokens: int = 0
    finish_reason: str | None = None
    status: int = 200
    error: str | None = None
    done: bool = False

    def mark_validated(self) -> None:
        if self.validated is None:
            self.validated = time.perf_counter()

    def timings(self) -> dict[str, float]:
        end = self.end or time.perf_counter()
        validated = self.validated or end
        total = end - self.start
        validation = validated - self.start
        queue = min(self.queue_s, max(end - validated, 0.0))
        inference = max(end - validated - queue, 0.0)
        per_token = inference / self.num_generated_tokens if self.num_generated_tokens else 0.0
        return {"total": total, "validation": validation, "queue": queue, "inference": inference,
                "time_per_token": per_token}

    def headers(self, compute_type: str) -> dict[str, str]:
        t = self.timings()
        ms = {k: str(int(v * 1000)) for k, v in t.items()}
        return {
            "x-compute-type": compute_type,
            "x-total-time": ms["total"],
            "x-validation-time": ms["validation"],
            "x-queue-time": ms["queue"],
            "x-inference-time": ms["inference"],
            "x-time-per-token": ms["time_per_token"],
            "x-prompt-tokens": str(self.num_prompt_tokens),
            "x-generated-tokens": str(self.num_generated_tokens),
            "x-request-id": self.request_id,
        }


class GenerationService:
    def __init__(self, engine, settings: ServerSettings, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.num_in_flight = 0
        self.started: asyncio.Future | None = None
        self._pool = ThreadPoolExecutor(max(settings.validation_workers, 1), thread_name_prefix="genserve-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    @property
    def config(self):
        return self.engine.config

    @property
    def compute_type(self) -> str:
        return str(getattr(self.engine, "device", "cpu"))

    @property
    def eos_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return eos if isinstance(eos, int) else 0

    # ---- admission -------------------------------------------------------------------------

    def begin(self, route: str, request_id: str | None = None, body: BaseModel | None = None) -> RequestRecord:
        """Count the request and take a concurrency slot, or raise 429 (`--max-concurrent-requests`)."""
        self.metrics.inc("tgi_request_count")
        record = RequestRecord(request_id=request_id or new_request_id(), route=route)
        if body is not None:
            warn_unknown_fields(route, body, record.request_id)
        if self.num_in_flight >= self.settings.max_concurrent_requests:
            self.fail(record, overloaded(), counted_slot=False)
            raise overloaded()
        self.num_in_flight += 1
        return record

    def succeed(self, record: RequestRecord) -> None:
        if record.done:
            return
        record.done = True
        record.end = time.perf_counter()
        self.num_in_flight -= 1
        t = record.timings()
        m = self.metrics
        m.inc("tgi_request_success")
        m.request_duration.observe(t["total"])
        m.request_validation_duration.observe(t["validation"])
        m.request_queue_duration.observe(t["queue"])
        m.request_inference_duration.observe(t["inference"])
        m.request_mean_time_per_token_duration.observe(t["time_per_token"])
        m.request_generated_tokens.observe(record.num_generated_tokens)
        self._log(record)

    def fail(self, record: RequestRecord, error: APIError | None, counted_slot: bool = True) -> None:
        """Record a failed, rejected or cancelled request (error None = client went away)."""
        if record.done:
            return
        record.done = True
        record.end = time.perf_counter()
        if counted_slot:
            self.num_in_flight -= 1
        if error is None:
            kind, record.status, record.error = "cancelled", 499, "client disconnected"
        else:
            kind = {"overloaded": "overloaded", "generation": "generation",
                    "incomplete_generation": "incomplete"}.get(error.error_type)
            kind = kind or ("validation" if error.status_code == 422 else error.error_type)
            record.status, record.error = error.status_code, error.message
        self.metrics.inc("tgi_request_failure", kind)
        self._log(record)

    def _log(self, record: RequestRecord) -> None:
        t = record.timings()
        level = logging.INFO if record.status < 500 else logging.ERROR
        logger.log(
            level,
            "%s %s %s prompt_tokens=%d generated_tokens=%d total_time=%.3fs",
            record.route, record.status, record.finish_reason or record.error or "",
            record.num_prompt_tokens, record.num_generated_tokens, t["total"],
            extra={"request_id": record.request_id, "fields": {
                "route": record.route, "status": record.status, "error": record.error,
                "finish_reason": record.finish_reason, "prompt_tokens": record.num_prompt_tokens,
                "generated_tokens": record.num_generated_tokens, "max_new_tokens": record.max_new_tokens,
                **{(k if k == "time_per_token" else f"{k}_time") + "_s": round(v, 6) for k, v in t.items()},
            }},
        )

    @contextlib.contextmanager
    def guard(self, record: RequestRecord):
        """Close the record however the block ends; unexpected errors become a JSON 500."""
        try:
            yield
        except APIError as e:
            self.fail(record, e)
            raise
        except (asyncio.CancelledError, ClientDisconnected):
            self.fail(record, None)
            raise
        except Exception as e:
            logger.exception("request failed", extra={"request_id": record.request_id})
            error = APIError(500, f"Internal error: {type(e).__name__}: {e}", "internal")
            self.fail(record, error)
            raise error from e

    # ---- validation ------------------------------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; long texts go to the `--validation-workers` threads so streams keep flowing."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise validation_error(f"`inputs` is not valid UTF-8: {e.reason}") from None

        def run() -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

        if len(text) <= INLINE_TOKENIZE_CHARS:
            return run()
        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    def check_params(self, params: SamplingParams) -> None:
        try:
            params.validate(self.config.max_stop_sequences, self.config.max_top_n_tokens)
        except ValueError as e:
            raise validation_error(str(e)) from None

    async def validate(self, record: RequestRecord, prompt_ids: list[int], params: SamplingParams) -> int:
        """Check the prompt against the limits; returns the resolved `max_new_tokens`."""
        self.check_params(params)
        try:
            compile_grammar = getattr(self.engine, "compile_grammar", None)
            if compile_grammar is not None:
                await compile_grammar(params)
            max_new_tokens = self.engine.validate(prompt_ids, params)
        except ValueError as e:
            raise validation_error(str(e)) from None
        record.num_prompt_tokens = len(prompt_ids)
        record.max_new_tokens = max_new_tokens
        self.metrics.request_input_length.observe(len(prompt_ids))
        self.metrics.request_max_new_tokens.observe(max_new_tokens)
        return max_new_tokens

    async def wait_ready(self) -> None:
        if self.started is None:
            return
        try:
            await asyncio.shield(self.started)
        except Exception as e:
            raise APIError(503, f"Model is not ready: {e}", "unhealthy") from None

    # ---- running ---------------------------------------------------------------------------

    async def stream(
        self, record: RequestRecord, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Engine outputs of one sequence; closing this iterator aborts the request in the engine."""
        record.mark_validated()
        last: float | None = None
        got_output = False
        # the engine's id is always fresh: clients may reuse an x-request-id
        gen = self.engine.generate(prompt_ids, params, new_request_id())
        async with contextlib.aclosing(gen):
            try:
                async for out in gen:
                    got_output = True
                    n = len(out.new_tokens)
                    if n:
                        now = time.perf_counter()
                        if last is None:
                            self.metrics.time_to_first_token.observe(now - record.start)
                            record.first_token = record.first_token or now
                        else:
                            for _ in range(n):
                                self.metrics.inter_token_latency.observe((now - last) / n)
                        last = record.last_token = now
                    if out.first_scheduled_time is not None and out.arrival_time:
                        record.queue_s = max(record.queue_s, out.first_scheduled_time - out.arrival_time)
                    yield out
            except ValueError as e:
                if got_output:
                    raise generation_error(str(e)) from e
                raise validation_error(str(e)) from None
            except (APIError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:
                logger.exception("generation failed", extra={"request_id": record.request_id})
                raise generation_error(str(e) or type(e).__name__) from e

    async def run(self, record: RequestRecord, prompt_ids: list[int], params: SamplingParams) -> SequenceResult:
        tokens: list[TokenInfo] = []
        prompt_logprobs = prompt_top_tokens = None
        async for out in self.stream(record, prompt_ids, params):
            tokens.extend(out.new_tokens)
            if out.prompt_logprobs is not None:
                prompt_logprobs, prompt_top_tokens = out.prompt_logprobs, out.prompt_top_tokens
            if out.finished:
                return SequenceResult(
                    tokens=tokens,
                    text=out.generated_text or "",
                    finish_reason=out.finish_reason or "length",
                    matched_stop=out.matched_stop,
                    num_prompt_tokens=out.num_prompt_tokens or len(prompt_ids),
                    num_generated_tokens=out.num_generated_tokens or len(tokens),
                    seed=out.seed,
                    prompt_logprobs=prompt_logprobs,
                    prompt_top_tokens=prompt_top_tokens,
                )
        raise APIError(500, "Incomplete generation", "incomplete_generation")

    async def run_many(self, record: RequestRecord, jobs: list[Job]) -> list[SequenceResult]:
        """Run several sequences concurrently (`n`, `best_of`, prompt lists); prefix caching shares prompts."""
        if len(jobs) == 1:
            return [await self.run(record, jobs[0].prompt_ids, jobs[0].params)]
        tasks = [
            asyncio.ensure_future(self.run(record, job.prompt_ids, job.params)) for job in jobs
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def stream_many(self, record: RequestRecord, jobs: list[Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Interleave the outputs of several sequences as they come, tagged with the job index."""
        if len(jobs) == 1:
            async for out in self.stream(record, jobs[0].prompt_ids, jobs[0].params):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            try:
                async for out in self.stream(record, job.prompt_ids, job.params):
                    queue.put_nowait((i, out))
            except BaseException as e:  # noqa: B036 - handed to the consumer, which re-raises
                queue.put_nowait((i, e))
                raise

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        remaining = len(jobs)
        try:
            while remaining:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True)
class Job:
    prompt_ids: list[int]
    params: SamplingParams


def derive_seeds(seed: int | None, n: int) -> list[int | None]:
    if seed is None:
        return [None] * n
    return [(seed + i) % SEED_MODULUS for i in range(n)]
