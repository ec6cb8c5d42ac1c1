"""Routes that hosting platforms call: SageMaker's /invocations and /ping, Vertex AI's /vertex.

Each reads the body's shape and hands it to the TGI or OpenAI route that serves it, as TGI does
(router/src/sagemaker.rs, vertex.rs): `inputs` -> /generate (TGI's `/` semantics), `messages` ->
chat completions, `prompt` -> completions.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from genserve.server.api import chat_routes, openai_routes, tgi_routes
from genserve.server.api.errors import APIError, format_pydantic_errors, validation_error
from genserve.server.api.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from genserve.server.api.tgi_routes import ERRORS

router = APIRouter(tags=["Text Generation Inference"])


def parse_body(model: type[BaseModel], data: Any, where: str = "") -> BaseModel:
    """`model` from decoded JSON, with the 422 the typed routes give (paths prefixed by `where`)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = json.loads(e.json())
        prefix = where.split(".") if where else []
        for err in errors:
            err["loc"] = [*prefix, *err.get("loc", ())]
        raise APIError(422, format_pydantic_errors(errors), "validation") from None


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise validation_error(f"Failed to parse the request body as JSON: {e}") from None


def body_kind(data: Any) -> str:
    """Which API a body belongs to, by the field only that API has."""
    if isinstance(data, dict):
        if "messages" in data:
            return "chat"
        if "prompt" in data:
            return "completion"
    return "generate"


@router.post("/invocations", responses=ERRORS)
async def invocations(request: Request) -> Response:
    """SageMaker: a TGI body (`inputs`) as `/`, an OpenAI chat body (`messages`) as /v1/chat/completions,
    an OpenAI completion body (`prompt`) as /v1/completions; streaming as each of them streams."""
    data = await json_body(request)
    kind = body_kind(data)
    if kind == "chat":
        return await chat_routes.chat_completions(parse_body(ChatCompletionRequest, data), request)
    if kind == "completion":
        return await openai_routes.completions(parse_body(CompletionRequest, data), request)
    return await tgi_routes.compat_generate(parse_body(GenerateRequest, data), request)


@router.get("/ping", responses={503: {"description": "Not ready"}})
async def ping(request: Request) -> Response:
    """SageMaker's health check: 200 once the model is ready, as /health."""
    return await tgi_routes.health(request)


async def _vertex_prediction(request: Request, instance: Any, index: int) -> str:
    where = f"instances.{index}"
    if body_kind(instance) == "chat":
        body = parse_body(ChatCompletionRequest, instance, where)
        if body.stream:
            raise validation_error(f"`{where}.stream` is not supported on /vertex")
        answer = await chat_routes.chat_completions(body, request)
        return json.loads(answer.body)["choices"][0]["message"]["content"] or ""
    req = parse_body(GenerateRequest, instance, where)
    if req.stream:
        raise validation_error(f"`{where}.stream` is not supported on /vertex")
    body, _ = await tgi_routes.generate_json(request, req, "/vertex")
    return body["generated_text"]


@router.post("/vertex", responses=ERRORS)
async def vertex(request: Request) -> JSONResponse:
    """Vertex AI: `{"instances": [{"inputs", "parameters"} | chat request, ...]}` -> `{"predictions": [text, ...]}`,
    the instances generated concurrently."""
    data = await json_body(request)
    instances = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(instances, list) or not instances:
        raise validation_error("`instances` must be a non-empty list of {inputs, parameters} or chat requests")
    tasks = [asyncio.ensure_future(_vertex_prediction(request, x, i)) for i, x in enumerate(instances)]
    try:
        predictions = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return JSONResponse({"predictions": list(predictions)})
