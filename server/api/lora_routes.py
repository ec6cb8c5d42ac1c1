"""vLLM's runtime LoRA routes (behind `--enable-lora-runtime-updates`): POST /v1/load_lora_adapter
{lora_name, lora_path} and /v1/unload_lora_adapter {lora_name}. A load is checked as a start-up adapter is;
a bad one answers 422 and changes nothing."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from genserve.server.api.errors import APIError, validation_error
from genserve.server.api.tgi_routes import service

router = APIRouter(tags=["LoRA"])


async def _body(request: Request) -> dict:
    svc = service(request)
    if not svc.config.enable_lora_runtime_updates:
        raise APIError(404, "runtime LoRA updates are off: start the server with --enable-lora-runtime-updates",
                       "not_found")
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the body must be a JSON object", "bad_request") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", "bad_request")
    return body


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(request: Request) -> PlainTextResponse:
    """Load a PEFT adapter folder and serve it under `lora_name` (vLLM's route)."""
    body = await _body(request)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", "bad_request")
    engine = service(request).engine
    if name in engine.adapters or name == engine.model_id:
        raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "bad_request")
    try:
        await engine.load_lora_adapter(name, path)
    except ValueError as e:
        raise validation_error(str(e)) from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(request: Request) -> PlainTextResponse:
    """Stop serving `lora_name`; requests already running with it finish with it."""
    body = await _body(request)
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "'lora_name' must be provided.", "bad_request")
    try:
        service(request).engine.unload_lora_adapter(name)
    except KeyError:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
