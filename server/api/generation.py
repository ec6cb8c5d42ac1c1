"""The one request pipeline every route goes through:

    open (count, 429, unknown-field warning, wait for the model)
      -> admit (validate once: limits, grammar, max_new_tokens)        -> AdmittedRequest
      -> run (JSON: every sequence to its end, abort when the client leaves)
         | sse (stream: the route renders events, the pipeline ends it: error event, incomplete check)
      -> finish (success / error / cancelled: metrics, log line, finish observers)

The TGI and OpenAI routes only translate their bodies into `Job`s and results back into their wire
format. Per-request tracing hooks in at `finish_observers` (called once per request, with its record).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import Receive

from genserve.server.api.disconnect import ClientDisconnected, unless_disconnected
from genserve.server.api.engine_client import EngineClient
from genserve.server.api.errors import (
    APIError,
    generation_error,
    incomplete_generation,
    internal_error,
    overloaded,
    validation_error,
)
from genserve.server.api.protocol import unknown_fields
from genserve.server.api.record import (
    AdmittedJob,
    AdmittedRequest,
    Job,
    RequestRecord,
    SequenceResult,
    best_sequence,
)
from genserve.server.api.settings import ServerSettings
from genserve.server.api.stream import SSEResponse
from genserve.server.metrics import Metrics
from genserve.server.outputs import RequestOutput, TokenInfo

logger = logging.getLogger("genserve.request")

INLINE_TOKENIZE_CHARS = 4096
TRACE_HEADERS = ("traceparent", "tracestate")
Render = Callable[[AsyncIterator[tuple[int, RequestOutput]]], AsyncIterator[bytes]]


def new_request_id() -> str:
    return uuid.uuid4().hex


def warn_unknown_fields(route: str, body: BaseModel, request_id: str | None = None) -> None:
    """One warning line naming the fields the body carried that genserve ignores (as vLLM does)."""
    names = unknown_fields(body)
    if names:
        logger.warning("%s: ignoring unknown fields: %s", route, ", ".join(names),
                       extra={"request_id": request_id, "fields": {"ignored_fields": names}})


class GenerationService:
    def __init__(self, engine: EngineClient, settings: ServerSettings, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.num_in_flight = 0
        self.started: asyncio.Future | None = None
        # called once per request when it ends (success, error or cancel): tracing spans go here
        self.finish_observers: list[Callable[[RequestRecord], None]] = []
        self._pool = ThreadPoolExecutor(max(settings.validation_workers, 1), thread_name_prefix="genserve-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    @property
    def config(self):
        return self.engine.config

    @property
    def compute_type(self) -> str:
        return str(self.engine.device)

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if isinstance(eos, int) else 0

    # ---- opening ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def opening(self, request: Request, route: str, body: BaseModel | None = None):
        """Open a request (count, slot or 429, unknown-field warning) and wait for the model; any error
        inside the block closes the record as failed."""
        record = self.begin(route, request.headers.get("x-request-id"), body)
        # only what tracing reads (never the API key): W3C trace context
        record.request_headers = {k: request.headers[k] for k in TRACE_HEADERS if k in request.headers}
        with self.guard(record):
            await self.wait_ready()
            yield record

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
            error = internal_error(e)
            self.fail(record, error)
            raise error from e

    async def wait_ready(self) -> None:
        if self.started is None:
            return
        try:
            await asyncio.shield(self.started)
        except Exception as e:
            raise APIError(503, f"Model is not ready: {e}", "unhealthy") from None

    # ---- admission -------------------------------------------------------------------------

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

    def check_params(self, params) -> None:
        """The parameters' own ranges (TGI's messages), before any tokenizing."""
        try:
            params.validate(self.config.max_stop_sequences, self.config.max_top_n_tokens)
        except ValueError as e:
            raise validation_error(str(e)) from None

    async def admit(self, record: RequestRecord, jobs: list[Job], count_best_only: bool = False) -> AdmittedRequest:
        """Validate every job once against the limits (grammars compiled off the event loop); the
        result is what `run` and `sse` accept."""
        admitted, compiled = [], set()
        try:
            for job in jobs:
                if job.params.grammar is not None and id(job.params.grammar) not in compiled:
                    await self.engine.compile_grammar(job.params)
                    compiled.add(id(job.params.grammar))
                admitted.append(AdmittedJob(job.prompt_ids, job.params, self.engine.validate(job.prompt_ids, job.params)))
        except ValueError as e:
            raise validation_error(str(e)) from None
        prompts = {id(job.prompt_ids): job.prompt_ids for job in jobs}
        record.num_prompt_tokens = sum(len(ids) for ids in prompts.values())
        record.max_new_tokens = max(job.max_new_tokens for job in admitted)
        for ids in prompts.values():
            self.metrics.request_input_length.observe(len(ids))
        self.metrics.request_max_new_tokens.observe(record.max_new_tokens)
        record.mark_validated()
        return AdmittedRequest(record, admitted, count_best_only)

    # ---- running ---------------------------------------------------------------------------

    async def _outputs(self, record: RequestRecord, job: AdmittedJob) -> AsyncIterator[RequestOutput]:
        """One sequence's engine outputs; closing this iterator aborts it in the engine."""
        last: float | None = None
        got_output = False
        # the engine's id is always fresh: clients may reuse an x-request-id
        gen = self.engine.generate(job.prompt_ids, job.params, new_request_id(), job.max_new_tokens)
        async with contextlib.aclosing(gen):
            try:
                async for out in gen:
                    got_output = True
                    if out.new_tokens:
                        now = time.perf_counter()
                        if last is None:
                            self.metrics.time_to_first_token.observe(now - record.start)
                            record.first_token = record.first_token or now
                        else:
                            for _ in out.new_tokens:
                                self.metrics.inter_token_latency.observe((now - last) / len(out.new_tokens))
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

    async def _collect(self, record: RequestRecord, job: AdmittedJob) -> SequenceResult:
        tokens: list[TokenInfo] = []
        prompt_logprobs = prompt_top_tokens = None
        async for out in self._outputs(record, job):
            tokens.extend(out.new_tokens)
            if out.prompt_logprobs is not None:
                prompt_logprobs, prompt_top_tokens = out.prompt_logprobs, out.prompt_top_tokens
            if out.finished:
                return SequenceResult(
                    tokens=tokens, text=out.generated_text or "", finish_reason=out.finish_reason or "length",
                    matched_stop=out.matched_stop, num_prompt_tokens=out.num_prompt_tokens or len(job.prompt_ids),
                    num_generated_tokens=out.num_generated_tokens or len(tokens), seed=out.seed,
                    prompt_logprobs=prompt_logprobs, prompt_top_tokens=prompt_top_tokens)
        raise incomplete_generation()

    async def run(self, admitted: AdmittedRequest, receive: Receive) -> list[SequenceResult]:
        """Every job to its end, concurrently (prefix caching shares their prompts); the client leaving
        aborts them all. Closes the record as a success."""
        record = admitted.record
        with self.guard(record):
            results = await unless_disconnected(receive, _gather([self._collect(record, j) for j in admitted.jobs]))
        counted = [best_sequence(results)] if admitted.count_best_only else results
        record.num_generated_tokens = sum(r.num_generated_tokens for r in counted)
        record.finish_reason = counted[0].finish_reason
        self.succeed(record)
        return results

    async def stream(self, admitted: AdmittedRequest) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The jobs' outputs as they come, tagged with the job's index; ended sequences are counted."""
        record, finished = admitted.record, 0
        async with contextlib.aclosing(self._merged(admitted)) as outputs:
            async for i, out in outputs:
                if out.finished:
                    finished += 1
                    record.num_generated_tokens += out.num_generated_tokens
                    record.finish_reason = out.finish_reason
                yield i, out
        if finished < len(admitted.jobs):
            raise incomplete_generation()

    async def _merged(self, admitted: AdmittedRequest) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every job's outputs interleaved as they arrive, tagged with the job's index."""
        record, jobs = admitted.record, admitted.jobs
        if len(jobs) == 1:
            # one sequence (nearly every stream): read directly, no pump task and queue hop per token
            async with contextlib.aclosing(self._outputs(record, jobs[0])) as outputs:
                async for out in outputs:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: AdmittedJob) -> None:
            try:
                async for out in self._outputs(record, job):
                    queue.put_nowait((i, out))
            except BaseException as e:  # noqa: B036 - handed to the consumer, which re-raises
                queue.put_nowait((i, e))
                raise
            queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        remaining = len(tasks)
        try:
            while remaining:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    remaining -= 1
                    continue
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def sse(self, admitted: AdmittedRequest, render: Render, error_event: Callable[[APIError], bytes],
            closing: Callable[[RequestRecord], list[bytes]] = lambda _: []) -> SSEResponse:
        """A streamed answer: `render` turns the outputs into the route's events; the pipeline ends it
        the same way for every route (success, or one error event; `closing` events either way, e.g.
        OpenAI's usage and [DONE]). A client that leaves cancels it, which aborts the engine requests."""
        record = admitted.record

        async def body() -> AsyncIterator[bytes]:
            outputs = self.stream(admitted)
            try:
                async with contextlib.aclosing(outputs), contextlib.aclosing(render(outputs)) as events:
                    async for event in events:
                        yield event
                self.succeed(record)
            except Exception as e:
                error = e if isinstance(e, APIError) else internal_error(e)
                self.fail(record, error)
                yield error_event(error)
            for event in closing(record):
                yield event

        headers = {"x-compute-type": self.compute_type, "x-request-id": record.request_id}
        return SSEResponse(body(), headers=headers, on_close=lambda: self.fail(record, None))

    # ---- finishing -------------------------------------------------------------------------

    def succeed(self, record: RequestRecord) -> None:
        if record.done:
            return
        self._close(record)
        t = record.timings()
        m = self.metrics
        m.inc("tgi_request_success")
        m.request_duration.observe(t["total"])
        m.request_validation_duration.observe(t["validation"])
        m.request_queue_duration.observe(t["queue"])
        m.request_inference_duration.observe(t["inference"])
        m.request_mean_time_per_token_duration.observe(t["time_per_token"])
        m.request_generated_tokens.observe(record.num_generated_tokens)
        self._finished(record)

    def fail(self, record: RequestRecord, error: APIError | None, counted_slot: bool = True) -> None:
        """Record a failed, rejected or cancelled request (error None = client went away)."""
        if record.done:
            return
        self._close(record, counted_slot)
        if error is None:
            kind, record.status, record.error = "cancelled", 499, "client disconnected"
        else:
            kind = {"overloaded": "overloaded", "generation": "generation",
                    "incomplete_generation": "incomplete"}.get(error.error_type)
            kind = kind or ("validation" if error.status_code == 422 else error.error_type)
            record.status, record.error = error.status_code, error.body()["error"]  # as the client saw it
        self.metrics.inc("tgi_request_failure", kind)
        self._finished(record)

    def _close(self, record: RequestRecord, counted_slot: bool = True) -> None:
        record.done = True
        record.end = time.perf_counter()
        if counted_slot:
            self.num_in_flight -= 1

    def _finished(self, record: RequestRecord) -> None:
        self._log(record)
        for observer in self.finish_observers:
            try:
                observer(record)
            except Exception:  # an observer (tracing) never fails a request
                logger.exception("finish observer failed", extra={"request_id": record.request_id})

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


async def _gather(coros: list) -> list:
    """All results, or the first error with the rest cancelled (their engine requests aborted)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
