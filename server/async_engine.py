"""The engine behind asyncio: a background thread steps the batch, each request reads its own queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from genserve.server.config import EngineConfig
from genserve.server.engine import EngineStats, LLMEngine, StepStats
from genserve.server.outputs import RequestOutput
from genserve.server.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


MAX_CONSECUTIVE_STEP_FAILURES = 3
# one step running longer than this means a wedged engine (a hung kernel or collective): /live turns 503
WEDGED_STEP_SECONDS = 600.0


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.model_id = engine.model_id
        self.model_dir = engine.model_dir
        self.dtype = engine.dtype
        self.device = engine.device.type
        self.model_path_kind = engine.model_path_kind
        self.adapters = engine.adapters
        self.is_ready = False
        self.step_observers: list[Callable[[StepStats], None]] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self._step_started_at: float | None = None
        self.wedged_step_seconds = WEDGED_STEP_SECONDS
        self.max_consecutive_step_failures = MAX_CONSECUTIVE_STEP_FAILURES  # --max-consecutive-step-failures

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    async def start(self) -> None:
        """Start the step thread and warm up with a short generation; `is_ready` turns True after."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="genserve-engine", daemon=True)
        self._thread.start()
        grammars = getattr(self.engine, "grammars", None)
        if grammars is not None:
            # llguidance's view of the vocabulary takes ~1.5 s to build: not on the first grammar request
            threading.Thread(target=grammars.warm_up, name="genserve-grammar-warm-up", daemon=True).start()
        warmup = self.tokenizer.encode("Hello")[:8] or [0]
        async for _ in self.generate(warmup, SamplingParams(max_new_tokens=2)):
            pass
        self.is_ready = True

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        # stopping workers is a collective: never while the step thread may still be mid-step
        if self._thread is None or not self._thread.is_alive():
            await asyncio.to_thread(self.engine.shutdown)

    def is_live(self) -> bool:
        """False once the step thread has died, or while one step has run for over `wedged_step_seconds`."""
        if self.error is not None or (self._thread is not None and not self._thread.is_alive()):
            return False
        started = self._step_started_at
        return started is None or time.monotonic() - started < self.wedged_step_seconds

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        return self.engine.validate(prompt_token_ids, params)

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile a request's grammar off the event loop (a large schema takes tens of ms; streams keep
        flowing meanwhile); validate() then finds it in the cache. ValueError when it is invalid."""
        grammars = getattr(self.engine, "grammars", None)
        if params.grammar is not None and grammars is not None:
            await asyncio.to_thread(grammars.compile, params.grammar)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Read and check the folder off the event loop; the step thread makes it resident when asked for."""
        from genserve.server.lora_adapters import check_adapter, resolve_source

        engine = self.engine

        def load() -> None:
            adapter = check_adapter(name, resolve_source(path), engine.hf_config, engine.model_id,
                                    engine.config.max_lora_rank)
            engine.runner.lora.check_targets(adapter)
            engine.adapters.add(adapter)

        await asyncio.to_thread(load)

    def unload_lora_adapter(self, name: str) -> None:
        self.engine.adapters.remove(name)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       max_new_tokens: int | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early aborts it and frees its KV blocks.
        `max_new_tokens`: `validate()`'s answer when the caller (the API's admission) already validated."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error}")
        # validated here, on the event loop, so the step thread never spends time on it
        if max_new_tokens is None:
            max_new_tokens = self.validate(prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        outputs: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = outputs
        self._inbox.put(("add", request_id, prompt_token_ids, params, max_new_tokens))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def _deliver(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            target.put_nowait(item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "abort":
                self.engine.abort(message[1])
                continue
            _, request_id, prompt, params, max_new_tokens = message
            try:
                self.engine.add_request(prompt, params, request_id, max_new_tokens)
            except ValueError as exc:
                self._loop.call_soon_threadsafe(self._deliver, request_id, exc)

    def _run(self) -> None:
        try:
            self._step_forever()
        except BaseException as exc:  # the step thread must never die silently: fail loudly instead
            logger.exception("the engine stopped")
            self.error = exc
            self._loop.call_soon_threadsafe(self._fail_waiting, exc)

    def _step_forever(self) -> None:
        engine = self.engine
        failures = 0
        while not self._stopping:
            self._drain_inbox()
            if not engine.has_unfinished:
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            self._step_started_at = time.monotonic()
            try:
                outputs, stats = engine.step()
            except Exception as exc:
                self._step_started_at = None
                logger.exception("engine step failed")
                self._fail_all(exc)
                failures += 1
                # a CUDA error poisons the context, and repeated failures mean the engine is broken:
                # stop, so /health turns 503 and Kubernetes restarts the pod; a one-off bug only fails its batch
                if engine.device.type == "cuda" or failures >= self.max_consecutive_step_failures:
                    raise
                continue
            self._step_started_at = None
            failures = 0
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver_many, outputs)
            if stats is not None:
                for observer in self.step_observers:
                    observer(stats)

    def _fail_waiting(self, exc: BaseException) -> None:
        """On the event loop: every request still waiting for output gets the engine's death."""
        for outputs in list(self._queues.values()):
            outputs.put_nowait(EngineDeadError(f"the engine stopped: {exc}"))

    def _deliver_many(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            self._deliver(output.request_id, output)

    def _fail_all(self, exc: Exception) -> None:
        # the failed step's batch only: requests still waiting were not part of it and go on
        in_step = [r for r in getattr(self.engine, "step_request_ids", ()) if r in self.engine.states]
        for request_id in in_step or list(self.engine.states):
            self.engine.abort(request_id)
            self._loop.call_soon_threadsafe(self._deliver, request_id, RuntimeError(f"generation failed: {exc}"))
