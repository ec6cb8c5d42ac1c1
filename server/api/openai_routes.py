"""OpenAI (legacy) completions and /v1/models; chat completions live in chat_routes."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.server.api.errors import APIError, not_supported, validation_error
from genserve.server.api.generation import GenerationService
from genserve.server.api.openai_common import (
    completion_logprobs,
    envelope,
    error_event,
    finish_reason,
    sampling_params,
    stream_closing,
    usage,
)
from genserve.server.api.protocol import Completion, CompletionRequest, ModelList
from genserve.server.api.record import AdmittedRequest, Job
from genserve.server.api.stream import sse_event
from genserve.server.api.tgi_routes import ERRORS, service
from genserve.server.api.vllm_extensions import prompt_logprobs_json, truncate_prompt, with_stop_string
from genserve.server.outputs import RequestOutput

router = APIRouter(tags=["OpenAI"])


def truncated_prompt(svc: GenerationService, text: str, ids: list[int], k: int | None) -> tuple[str, list[int]]:
    kept = truncate_prompt(ids, k, svc.config.max_input_tokens)
    return (text, ids) if len(kept) == len(ids) else (svc.tokenizer.decode(kept), kept)


async def completion_prompts(svc: GenerationService, body: CompletionRequest) -> list[tuple[str, list[int]]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise validation_error("`prompt` cannot be empty")
    if len(items) > svc.settings.max_client_batch_size:
        raise APIError(422, "Number of prompts exceeds the maximum allowed batch size of "
                            f"{svc.settings.max_client_batch_size}", "batch size exceeded")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, await svc.encode(item)))
        else:
            vocab = len(svc.tokenizer)
            if any(not 0 <= t < vocab for t in item):
                raise validation_error(f"token ids in `prompt` must be >= 0 and < {vocab}")
            out.append((svc.tokenizer.decode(item), list(item)))
    return out


@router.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request):
    """OpenAI (legacy) completions: `echo`, `logprobs` (int), prompt lists; `suffix` is rejected."""
    svc = service(request)
    async with svc.opening(request, request.url.path, body) as record:  # /invocations too
        if body.suffix is not None:
            raise APIError(422, "Suffix is not supported and can be achieved by preprocessing the prompt.",
                           "suffix not supported")
        if body.best_of not in (None, 1):
            raise not_supported("`best_of` is not supported on /v1/completions; use `n`")
        if body.logprobs is not None and not 0 <= body.logprobs <= svc.config.max_top_n_tokens:
            raise validation_error(f"`logprobs` must be >= 0 and <= {svc.config.max_top_n_tokens}. Given: {body.logprobs}")
        params = sampling_params(body, svc, body.max_tokens, body.logprobs or 0)
        if body.echo and body.logprobs is not None:  # the echoed prompt gets its log-probabilities too
            params = [replace(p, prompt_logprobs=True) for p in params]
        prompts = [truncated_prompt(svc, text, ids, body.truncate_prompt_tokens)
                   for text, ids in await completion_prompts(svc, body)]
        admitted = await svc.admit(record, [Job(ids, p) for _, ids in prompts for p in params])
    n = len(params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        env = envelope(svc, "text_completion", rid, created, params[0].adapter_id)
        return svc.sse(admitted, lambda outputs: _completion_events(svc, admitted, outputs, env, body, prompts, n),
                       error_event, stream_closing(env, include_usage))
    results = await svc.run(admitted, request.receive)
    choices = []
    for i, r in enumerate(results):
        prompt_text, prompt_ids = prompts[i // n]
        text = (prompt_text if body.echo else "") + with_stop_string(r.text, r.matched_stop,
                                                                       body.include_stop_str_in_output)
        lp = None
        if body.logprobs is not None:
            prefix = [svc.tokenizer.decode([t]) for t in prompt_ids] if body.echo else None
            lp = completion_logprobs(r.tokens, body.logprobs, 0, prefix, r.prompt_logprobs, r.prompt_top_tokens)
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason(r.finish_reason)})
        if body.prompt_logprobs is not None:
            choices[-1]["prompt_logprobs"] = prompt_logprobs_json(prompt_ids, r.prompt_logprobs, r.prompt_top_tokens,
                                                                  body.prompt_logprobs, svc.tokenizer)
    return JSONResponse({
        **envelope(svc, "text_completion", rid, created, params[0].adapter_id), "choices": choices,
        "usage": usage(record.num_prompt_tokens, record.num_generated_tokens),
    }, headers=record.headers(svc.compute_type))


async def _completion_events(
    svc: GenerationService, admitted: AdmittedRequest, outputs: AsyncIterator[tuple[int, RequestOutput]],
    envelope_: dict, body: CompletionRequest, prompts: list[tuple[str, list[int]]], n: int,
) -> AsyncIterator[bytes]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    num_jobs = len(admitted.jobs)

    def chunk(i: int, text: str, lp=None, reason=None) -> bytes:
        return sse_event({**envelope_, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                    "finish_reason": reason}], **extra})

    offsets = [0] * num_jobs
    # echo + logprobs: the prompt chunk waits for the prompt's log-probabilities (with the first token)
    echo_waits = body.echo and body.logprobs is not None
    if body.echo and not echo_waits:
        for i in range(num_jobs):
            prompt_text = prompts[i // n][0]
            offsets[i] = len(prompt_text)
            yield chunk(i, prompt_text)
    echoed: set[int] = set()
    async for i, out in outputs:
        if echo_waits and i not in echoed:
            echoed.add(i)
            prompt_text, prompt_ids = prompts[i // n]
            prefix = [svc.tokenizer.decode([t]) for t in prompt_ids]
            yield chunk(i, prompt_text, completion_logprobs([], body.logprobs, 0, prefix, out.prompt_logprobs,
                                                            out.prompt_top_tokens))
            offsets[i] = sum(len(t) for t in prefix)
        if out.text_delta or (body.logprobs is not None and out.new_tokens):
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(out.new_tokens, body.logprobs, offsets[i])
                offsets[i] += sum(len(t.text) for t in out.new_tokens)
            yield chunk(i, out.text_delta, lp)
        if out.finished:
            if body.include_stop_str_in_output and out.matched_stop:
                yield chunk(i, out.matched_stop)
            yield chunk(i, "", None, finish_reason(out.finish_reason))


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> JSONResponse:
    """The served model, then its LoRA adapters (vLLM's cards: parent = the base, root = the folder)."""
    svc = service(request)
    model_id, created = str(svc.engine.model_id), request.app.state.created
    adapters = svc.engine.adapters
    return JSONResponse({"object": "list", "data": [
        # as TGI: the model id is its owner
        {"id": model_id, "object": "model", "created": created, "owned_by": model_id},
        *({"id": name, "object": "model", "created": created, "owned_by": model_id, "parent": model_id,
           "root": str(adapters.get(adapters.by_name[name]).path)} for name in adapters.names),
    ]})


