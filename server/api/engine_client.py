"""What the HTTP layer needs from an engine: `AsyncEngine` implements it, and so do the test fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from genserve.server.config import EngineConfig
from genserve.server.outputs import RequestOutput
from genserve.server.sampling_params import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    config: EngineConfig
    tokenizer: Any  # a transformers tokenizer
    model_id: str
    model_dir: Path | None
    dtype: str
    device: str
    model_path_kind: str  # "native" or "transformers"
    is_ready: bool
    error: BaseException | None  # set once the engine has died
    step_observers: list[Callable[[Any], None]]
    adapters: Any  # a lora_adapters.AdapterRegistry: the LoRA adapters served by name

    async def start(self) -> None:
        """Begin serving (warm-up included); `is_ready` turns True after."""

    async def shutdown(self) -> None: ...

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the limits; its max_new_tokens. ValueError with TGI's wording."""

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the request's grammar, if any, off the event loop. ValueError when it is invalid."""

    def stats(self) -> Any:
        """Counts for /metrics: an EngineStats."""

    def abort(self, request_id: str) -> None: ...

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Check a PEFT folder and serve it as `name`; ValueError (one line) when it cannot serve."""

    def unload_lora_adapter(self, name: str) -> None:
        """Stop serving adapter `name`; KeyError when there is none."""

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 max_new_tokens: int | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; closing the iterator early aborts it. `max_new_tokens` is
        `validate()`'s answer when the caller already validated (it is then not checked again)."""
