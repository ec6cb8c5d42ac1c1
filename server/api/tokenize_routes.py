"""Tokenizer routes: TGI's /chat_tokenize, vLLM's /v1/tokenize and /v1/detokenize (TGI's /tokenize sits
with the other TGI routes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.server.api.chat_routes import chat_prompt, chat_unsupported
from genserve.server.api.errors import validation_error
from genserve.server.api.generation import GenerationService, warn_unknown_fields
from genserve.server.api.platform_routes import json_body, parse_body
from genserve.server.api.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from genserve.server.api.tgi_routes import ERRORS, service
from genserve.server.api.tools import plan_tools

router = APIRouter()


def _checked_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise validation_error(f"`inputs` is not valid UTF-8: {e.reason}") from None
    return text


def simple_tokens(svc: GenerationService, text: str, add_special_tokens: bool) -> list[dict]:
    """TGI's SimpleToken list: id, its text and its character offsets in `text`."""
    enc = svc.tokenizer(_checked_text(text), add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return [{"id": i, "text": text[a:b], "start": a, "stop": b}
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


@router.post("/chat_tokenize", tags=["Text Generation Inference"], responses=ERRORS)
async def chat_tokenize(body: ChatCompletionRequest, request: Request) -> JSONResponse:
    """The chat template rendered for `messages` (tools included), and its tokens."""
    svc = service(request)
    svc.metrics.inc("tgi_request_count")
    warn_unknown_fields("/chat_tokenize", body)
    text = chat_prompt(svc, body, chat_unsupported(body, svc))
    return JSONResponse({"tokenize_response": simple_tokens(svc, text, add_special_tokens=False),
                         "templated_text": text})


@router.post("/v1/tokenize", tags=["OpenAI"], responses=ERRORS)
async def tokenize(request: Request) -> JSONResponse:
    """vLLM's: `{"prompt"}` or `{"messages"}` -> `{"count", "max_model_len", "tokens", "token_strs"}`."""
    svc = service(request)
    data = await json_body(request)
    if isinstance(data, dict) and "messages" in data:
        body = parse_body(TokenizeChatRequest, data)
        text = chat_prompt(svc, body, plan_tools(body.tools, body.tool_choice))
    else:
        body = parse_body(TokenizeCompletionRequest, data)
        text = body.prompt
    warn_unknown_fields("/v1/tokenize", body)
    ids = list(svc.tokenizer(_checked_text(text), add_special_tokens=body.add_special_tokens)["input_ids"])
    strs = svc.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return JSONResponse({"count": len(ids), "max_model_len": svc.config.max_total_tokens, "tokens": ids,
                         "token_strs": strs})


@router.post("/v1/detokenize", tags=["OpenAI"], responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    """vLLM's: `{"tokens": [ids]}` -> `{"prompt": text}`."""
    svc = service(request)
    warn_unknown_fields("/v1/detokenize", body)
    vocab = len(svc.tokenizer)
    if any(not 0 <= t < vocab for t in body.tokens):
        raise validation_error(f"`tokens` must be >= 0 and < {vocab}")
    return JSONResponse({"prompt": svc.tokenizer.decode(body.tokens)})
