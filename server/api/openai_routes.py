"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.server.api.disconnect import unless_disconnected
from genserve.server.api.errors import APIError, not_supported, validation_error
from genserve.server.api.generation import GenerationService, Job, RequestRecord, SequenceResult, derive_seeds
from genserve.server.api.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
    ModelList,
    ResponseFormat,
    _SamplingFields,
)
from genserve.server.api.settings import server_version
from genserve.server.api.stream import DONE, SSEResponse, sse_event
from genserve.server.api.tgi_routes import ERRORS, service
from genserve.server.api.tools import (
    PlainAnswerStream,
    ToolPlan,
    history_message,
    parse_tool_output,
    plan_tools,
    tool_messages,
)
from genserve.server.api.vllm_extensions import (
    extension_params,
    prompt_logprobs_json,
    truncate_prompt,
    with_stop_string,
)
from genserve.server.grammar import GrammarSpec
from genserve.server.outputs import TokenInfo, TopToken
from genserve.server.sampling_params import SamplingParams

router = APIRouter(tags=["OpenAI"])

FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def finish_reason(reason: str | None) -> str | None:
    return FINISH_REASONS.get(reason or "", reason)


def response_format_grammar(fmt: ResponseFormat | None) -> GrammarSpec | None:
    """OpenAI's `response_format` (and TGI's `json`/`regex` spelling of it) as a grammar; None for text."""
    if fmt is None or fmt.type == "text":
        return None
    extra = fmt.model_extra or {}
    try:
        if fmt.type == "json_object":
            return GrammarSpec.json_schema({"type": "object"})
        if fmt.type == "json_schema":
            spec = extra.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ValueError("`response_format.json_schema.schema` is required for type `json_schema`")
            return GrammarSpec.json_schema(spec["schema"])
        if fmt.type == "json":
            return GrammarSpec.json_schema(extra.get("value"))
        if fmt.type == "regex":
            return GrammarSpec.regex(extra.get("value"))
    except ValueError as e:
        raise validation_error(str(e)) from None
    raise validation_error(f"`response_format` of type `{fmt.type}` is not supported; use one of "
                           "text, json_object, json_schema, json, regex")


def parse_logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's {"token id as a string": bias}; ranges are checked with the other parameters."""
    out = {}
    for key, bias in (raw or {}).items():
        try:
            out[int(key)] = float(bias)
        except ValueError:
            raise validation_error(f"`logit_bias` keys must be token ids; got {key!r}") from None
    return out


def sampling_params(
    body: _SamplingFields, svc: GenerationService, max_tokens: int | None, top_n_tokens: int,
    grammar: GrammarSpec | None = None,
) -> list[SamplingParams]:
    """OpenAI semantics: sampling unless temperature is 0; one SamplingParams per choice (`n`)."""
    cfg = svc.config
    n = 1 if body.n is None else body.n
    if not 1 <= n <= cfg.max_best_of:
        raise validation_error(f"`n` must be >= 1 and <= {cfg.max_best_of} (--max-best-of). Given: {n}")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
        raise validation_error("`temperature` must be >= 0.0 and <= 2.0")
    if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
        raise validation_error("`top_p` must be > 0.0 and <= 1.0")
    if body.top_k is not None and body.top_k < 0:
        raise validation_error("`top_k` must be strictly positive")
    if max_tokens is not None and max_tokens <= 0:
        raise validation_error("`max_tokens` must be strictly positive")
    logit_bias = parse_logit_bias(body.logit_bias)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    extensions = extension_params(body, svc, top_n_tokens)
    base = SamplingParams(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed,
        stop=stop,
        grammar=grammar or response_format_grammar(body.response_format),
        logit_bias=logit_bias,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        stop_token_ids=list(body.stop_token_ids or []),
        skip_special_tokens=body.skip_special_tokens,
        **extensions,
    )
    svc.check_params(base)
    return [replace(base, seed=seed, stop=list(stop)) for seed in derive_seeds(body.seed, n)]


def _message_text(m: ChatMessage) -> str | None:
    if m.content is None or isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:
        if part.type != "text":
            raise not_supported(f"message content of type `{part.type}` is not supported: genserve serves text models")
        parts.append(part.text or "")
    return "\n".join(parts)


# apply_chat_template's own arguments: chat_template_kwargs may not set them
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tokenize", "add_generation_prompt",
                                      "continue_final_message", "chat_template", "return_dict", "tools",
                                      "documents", "tokenizer_kwargs", "return_assistant_tokens_mask"})


def chat_template_options(body) -> dict:
    """vLLM's add_generation_prompt / continue_final_message / chat_template_kwargs, checked."""
    if body.continue_final_message and body.add_generation_prompt:
        raise validation_error("Cannot set both `continue_final_message` and `add_generation_prompt` to true; "
                               "set `add_generation_prompt` to false to continue the final message")
    if body.continue_final_message and body.messages[-1].role != "assistant":
        raise validation_error("`continue_final_message` needs the last message to be the assistant's")
    extra = dict(body.chat_template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(extra))
    if reserved:
        raise validation_error(f"`chat_template_kwargs` cannot set {', '.join(reserved)}")
    return {"add_generation_prompt": body.add_generation_prompt,
            "continue_final_message": body.continue_final_message, **extra}


def chat_prompt(svc: GenerationService, body, plan: ToolPlan | None = None) -> str:
    """The prompt text of a chat body (a ChatCompletionRequest or TokenizeChatRequest)."""
    options = chat_template_options(body)
    template = svc.tokenizer.chat_template if isinstance(svc.tokenizer.chat_template, str) else ""
    messages = []
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        if m.tool_calls:
            messages.append(history_message(role, _message_text(m), m.tool_calls, template))
        else:
            messages.append({"role": role, "content": _message_text(m) or ""})
    kwargs: dict = {}
    if plan is not None:
        messages, kwargs = tool_messages(messages, plan, body.tool_prompt, template)
    try:
        return svc.tokenizer.apply_chat_template(messages, tokenize=False, **options, **kwargs)
    except Exception as e:  # jinja2 errors, raise_exception() in templates, missing template
        raise APIError(422, f"Template error: {e}", "template_error") from None


def chat_unsupported(body: ChatCompletionRequest, svc: GenerationService) -> ToolPlan | None:
    """Reject what cannot be served; returns the tool-calling plan when `tools` are given."""
    plan = plan_tools(body.tools, body.tool_choice)
    if plan is not None and plan.grammar is not None and response_format_grammar(body.response_format):
        raise validation_error("`response_format` cannot be combined with tool calls; use `tool_choice: none`")
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise validation_error("`top_logprobs` requires `logprobs` to be true")
        if not 0 <= body.top_logprobs <= svc.config.max_top_n_tokens:
            raise validation_error(
                f"`top_logprobs` must be >= 0 and <= {svc.config.max_top_n_tokens}. Given: {body.top_logprobs}"
            )
    return plan


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[TokenInfo], top_n: int) -> dict:
    return {"content": [
        {"token": t.text, "logprob": t.logprob, "bytes": _bytes(t.text),
         "top_logprobs": [{"token": x.text, "logprob": x.logprob, "bytes": _bytes(x.text)} for x in t.top_tokens[:top_n]]}
        for t in tokens
    ]}


def completion_logprobs(tokens: list[TokenInfo], top_n: int, offset: int, prefix: list[str] | None = None,
                        prefix_logprobs: list[float | None] | None = None,
                        prefix_tops: list[list[TopToken]] | None = None) -> dict:
    """OpenAI's legacy logprobs; echoed prompt tokens first (the first one has nothing to condition on)."""
    texts, logprobs, tops, offsets = [], [], [], []
    for k, text in enumerate(prefix or []):
        texts.append(text)
        logprobs.append(prefix_logprobs[k] if prefix_logprobs else None)
        scored = k > 0 and prefix_logprobs is not None and prefix_logprobs[k] is not None
        tops.append({x.text: x.logprob for x in prefix_tops[k][:top_n]} if scored and prefix_tops and top_n else None)
        offsets.append(offset)
        offset += len(text)
    for t in tokens:
        texts.append(t.text)
        logprobs.append(t.logprob)
        tops.append({x.text: x.logprob for x in t.top_tokens[:top_n]} if top_n else None)
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _envelope(svc: GenerationService, kind: str, rid: str, created: int) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": str(svc.engine.model_id),
            "system_fingerprint": f"{server_version()}-native"}


async def _prepared(request: Request, route: str, body, prepare) -> tuple[GenerationService, RequestRecord, list[Job], list]:
    svc = service(request)
    record = svc.begin(route, request.headers.get("x-request-id"), body)
    with svc.guard(record):
        await svc.wait_ready()
        jobs, extra = await prepare(svc, record)
    return svc, record, jobs, extra


async def _finish(request: Request, svc: GenerationService, record: RequestRecord, jobs: list[Job]) -> list[SequenceResult]:
    with svc.guard(record):
        results = await unless_disconnected(request.receive, svc.run_many(record, jobs))
    record.num_generated_tokens = sum(r.num_generated_tokens for r in results)
    record.finish_reason = results[0].finish_reason
    svc.succeed(record)
    return results


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI chat completions: the tokenizer's chat template, `n`, logprobs, streaming with usage."""
    async def prepare(svc: GenerationService, record: RequestRecord):
        plan = chat_unsupported(body, svc)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top_n = (body.top_logprobs or 0) if body.logprobs else 0
        params = sampling_params(body, svc, max_tokens, top_n, plan.grammar if plan else None)
        ids = await svc.encode(chat_prompt(svc, body, plan), add_special_tokens=False)
        ids = truncate_prompt(ids, body.truncate_prompt_tokens, svc.config.max_input_tokens)
        await svc.validate(record, ids, params[0])
        return [Job(ids, p) for p in params], [len(ids), plan]

    svc, record, jobs, (num_prompt, plan) = await _prepared(request, "/v1/chat/completions", body, prepare)
    # with a tool grammar the output is a call to parse, not text to show as it comes
    calls = plan if plan is not None and plan.grammar is not None else None
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        envelope = _envelope(svc, "chat.completion.chunk", rid, created)
        events = _openai_stream(svc, record, envelope, include_usage, num_prompt,
                                _chat_events(svc, record, jobs, envelope, bool(body.logprobs), top_n, include_usage,
                                             calls, body.include_stop_str_in_output))
        return SSEResponse(events, headers={"x-compute-type": svc.compute_type, "x-request-id": record.request_id},
                           on_close=lambda: svc.fail(record, None))
    results = await _finish(request, svc, record, jobs)
    answer = {
        **_envelope(svc, "chat.completion", rid, created),
        "choices": [_chat_choice(i, r, calls, chat_logprobs(r.tokens, top_n) if body.logprobs else None,
                                 body.include_stop_str_in_output)
                    for i, r in enumerate(results)],
        "usage": _usage(num_prompt, sum(r.num_generated_tokens for r in results)),
    }
    if body.prompt_logprobs is not None:
        answer["prompt_logprobs"] = prompt_logprobs_json(jobs[0].prompt_ids, results[0].prompt_logprobs,
                                                         results[0].prompt_top_tokens, body.prompt_logprobs,
                                                         svc.tokenizer)
    return JSONResponse(answer, headers=record.headers(svc.compute_type))


def _chat_choice(index: int, result: SequenceResult, calls: ToolPlan | None, logprobs: dict | None,
                 include_stop: bool = False) -> dict:
    message: dict = {"role": "assistant", "content": with_stop_string(result.text, result.matched_stop, include_stop)}
    reason = finish_reason(result.finish_reason)
    if calls is not None:
        answer = parse_tool_output(result.text, calls)
        message["content"] = answer.content
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
            reason = "tool_calls"
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


def _usage(num_prompt: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": completion_tokens,
            "total_tokens": num_prompt + completion_tokens}


async def _openai_stream(svc: GenerationService, record: RequestRecord, envelope: dict, include_usage: bool,
                         num_prompt: int, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, then the usage chunk and `[DONE]`; an error mid-stream becomes an SSE error event."""
    try:
        async for event in chunks:
            yield event
        svc.succeed(record)
        if include_usage:
            yield sse_event({**envelope, "choices": [], "usage": _usage(num_prompt, record.num_generated_tokens)})
    except Exception as e:
        error = e if isinstance(e, APIError) else APIError(500, f"Internal error: {type(e).__name__}: {e}", "internal")
        svc.fail(record, error)
        yield sse_event(error.body())
    yield DONE


async def _chat_events(
    svc: GenerationService, record: RequestRecord, jobs: list[Job], envelope: dict,
    logprobs: bool, top_n: int, include_usage: bool, calls: ToolPlan | None = None, include_stop: bool = False,
) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, delta: dict, lp=None, reason=None) -> bytes:
        return sse_event({**envelope, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}],
                          **extra})

    # tool mode: a call is sent whole when complete; a plain `auto` answer streams as it decodes
    held: dict[int, list[TokenInfo]] = {i: [] for i in range(len(jobs))}
    plain = {i: PlainAnswerStream() for i in range(len(jobs))}
    for i in range(len(jobs)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, out in svc.stream_many(record, jobs):
        if calls is not None:
            held[i].extend(out.new_tokens)
            content = plain[i].feed(out.text_delta)
            if content:
                yield chunk(i, {"content": content}, chat_logprobs(held[i], top_n) if logprobs else None)
                held[i] = []
        elif out.text_delta or (logprobs and out.new_tokens):
            yield chunk(i, {"content": out.text_delta}, chat_logprobs(out.new_tokens, top_n) if logprobs else None)
        if out.finished:
            record.num_generated_tokens += out.num_generated_tokens
            record.finish_reason = out.finish_reason
            reason = finish_reason(out.finish_reason)
            if calls is not None and not plain[i].streaming:
                answer = parse_tool_output(out.generated_text or "", calls)
                lp = chat_logprobs(held[i], top_n) if logprobs else None
                if answer.tool_calls:
                    reason = "tool_calls"
                    yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(answer.tool_calls)]}, lp)
                else:
                    yield chunk(i, {"content": answer.content}, lp)
            elif include_stop and out.matched_stop:
                yield chunk(i, {"content": out.matched_stop})
            yield chunk(i, {}, None, reason)


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
    async def prepare(svc: GenerationService, record: RequestRecord):
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
        for _, ids in prompts:
            await svc.validate(record, ids, params[0])
        record.num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        return [Job(ids, p) for _, ids in prompts for p in params], [prompts, len(params)]

    svc, record, jobs, (prompts, n) = await _prepared(request, "/v1/completions", body, prepare)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    num_prompt = record.num_prompt_tokens
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        envelope = _envelope(svc, "text_completion", rid, created)
        events = _openai_stream(svc, record, envelope, include_usage, num_prompt,
                                _completion_events(svc, record, jobs, envelope, body, prompts, n, include_usage))
        return SSEResponse(events, headers={"x-compute-type": svc.compute_type, "x-request-id": record.request_id},
                           on_close=lambda: svc.fail(record, None))
    results = await _finish(request, svc, record, jobs)
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
        **_envelope(svc, "text_completion", rid, created), "choices": choices,
        "usage": _usage(num_prompt, sum(r.num_generated_tokens for r in results)),
    }, headers=record.headers(svc.compute_type))


async def _completion_events(
    svc: GenerationService, record: RequestRecord, jobs: list[Job], envelope: dict, body: CompletionRequest,
    prompts: list[tuple[str, list[int]]], n: int, include_usage: bool,
) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, text: str, lp=None, reason=None) -> bytes:
        return sse_event({**envelope, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}],
                          **extra})

    offsets = [0] * len(jobs)
    # echo + logprobs: the prompt chunk waits for the prompt's log-probabilities (with the first token)
    echo_waits = body.echo and body.logprobs is not None
    if body.echo and not echo_waits:
        for i in range(len(jobs)):
            prompt_text = prompts[i // n][0]
            offsets[i] = len(prompt_text)
            yield chunk(i, prompt_text)
    echoed: set[int] = set()
    async for i, out in svc.stream_many(record, jobs):
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
            record.num_generated_tokens += out.num_generated_tokens
            record.finish_reason = out.finish_reason
            if body.include_stop_str_in_output and out.matched_stop:
                yield chunk(i, out.matched_stop)
            yield chunk(i, "", None, finish_reason(out.finish_reason))


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> JSONResponse:
    """The one served model."""
    svc = service(request)
    return JSONResponse({"object": "list", "data": [
        # as TGI: the model id is its owner
        {"id": str(svc.engine.model_id), "object": "model", "created": request.app.state.created,
         "owned_by": str(svc.engine.model_id)}
    ]})


