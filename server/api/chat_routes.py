"""OpenAI chat completions: the chat template (with tools one step before generation), and the
answer (tool calls parsed one step after)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from genserve.server.api.errors import APIError, not_supported, validation_error
from genserve.server.api.generation import GenerationService
from genserve.server.api.openai_common import (
    chat_logprobs,
    envelope,
    error_event,
    finish_reason,
    response_format_grammar,
    sampling_params,
    stream_closing,
    usage,
)
from genserve.server.api.protocol import ChatCompletion, ChatCompletionRequest, ChatMessage
from genserve.server.api.record import AdmittedRequest, Job, SequenceResult
from genserve.server.api.stream import sse_event
from genserve.server.api.tgi_routes import ERRORS, service
from genserve.server.api.tools import (
    PlainAnswerStream,
    ToolPlan,
    history_message,
    parse_tool_output,
    plan_tools,
    tool_messages,
)
from genserve.server.api.vllm_extensions import prompt_logprobs_json, truncate_prompt, with_stop_string
from genserve.server.outputs import RequestOutput, TokenInfo

router = APIRouter(tags=["OpenAI"])


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


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI chat completions: the tokenizer's chat template, `n`, logprobs, tools, streaming with usage."""
    svc = service(request)
    async with svc.opening(request, request.url.path, body) as record:  # /invocations, /vertex too
        plan = chat_unsupported(body, svc)  # tools: one step before generation (grammar + template)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top_n = (body.top_logprobs or 0) if body.logprobs else 0
        params = sampling_params(body, svc, max_tokens, top_n, plan.grammar if plan else None)
        ids = await svc.encode(chat_prompt(svc, body, plan), add_special_tokens=False)
        ids = truncate_prompt(ids, body.truncate_prompt_tokens, svc.config.max_input_tokens)
        admitted = await svc.admit(record, [Job(ids, p) for p in params])
    # with a tool grammar the output is a call to parse, not text to show as it comes
    calls = plan if plan is not None and plan.grammar is not None else None
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        env = envelope(svc, "chat.completion.chunk", rid, created, params[0].adapter_id)
        return svc.sse(admitted, lambda outputs: _chat_events(admitted, outputs, env, body, top_n, calls),
                       error_event, stream_closing(env, include_usage))
    results = await svc.run(admitted, request.receive)
    answer = {
        **envelope(svc, "chat.completion", rid, created, params[0].adapter_id),
        "choices": [_chat_choice(i, r, calls, chat_logprobs(r.tokens, top_n) if body.logprobs else None,
                                 body.include_stop_str_in_output)
                    for i, r in enumerate(results)],
        "usage": usage(record.num_prompt_tokens, record.num_generated_tokens),
    }
    if body.prompt_logprobs is not None:
        answer["prompt_logprobs"] = prompt_logprobs_json(ids, results[0].prompt_logprobs,
                                                         results[0].prompt_top_tokens, body.prompt_logprobs,
                                                         svc.tokenizer)
    return JSONResponse(answer, headers=record.headers(svc.compute_type))


def _chat_choice(index: int, result: SequenceResult, calls: ToolPlan | None, logprobs: dict | None,
                 include_stop: bool = False) -> dict:
    """One choice; with tools, the output parsed into calls (the step after generation)."""
    message: dict = {"role": "assistant", "content": with_stop_string(result.text, result.matched_stop, include_stop)}
    reason = finish_reason(result.finish_reason)
    if calls is not None:
        answer = parse_tool_output(result.text, calls)
        message["content"] = answer.content
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
            reason = "tool_calls"
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


async def _chat_events(
    admitted: AdmittedRequest, outputs: AsyncIterator[tuple[int, RequestOutput]], envelope_: dict,
    body: ChatCompletionRequest, top_n: int, calls: ToolPlan | None,
) -> AsyncIterator[bytes]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    logprobs, num_jobs = bool(body.logprobs), len(admitted.jobs)

    def chunk(i: int, delta: dict, lp=None, reason=None) -> bytes:
        return sse_event({**envelope_, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                                    "finish_reason": reason}], **extra})

    # tool mode: a call is sent whole when complete; a plain `auto` answer streams as it decodes
    held: dict[int, list[TokenInfo]] = {i: [] for i in range(num_jobs)}
    plain = {i: PlainAnswerStream() for i in range(num_jobs)}
    for i in range(num_jobs):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, out in outputs:
        if calls is not None:
            held[i].extend(out.new_tokens)
            content = plain[i].feed(out.text_delta)
            if content:
                yield chunk(i, {"content": content}, chat_logprobs(held[i], top_n) if logprobs else None)
                held[i] = []
        elif out.text_delta or (logprobs and out.new_tokens):
            yield chunk(i, {"content": out.text_delta}, chat_logprobs(out.new_tokens, top_n) if logprobs else None)
        if out.finished:
            reason = finish_reason(out.finish_reason)
            if calls is not None and not plain[i].streaming:
                answer = parse_tool_output(out.generated_text or "", calls)
                lp = chat_logprobs(held[i], top_n) if logprobs else None
                if answer.tool_calls:
                    reason = "tool_calls"
                    yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(answer.tool_calls)]}, lp)
                else:
                    yield chunk(i, {"content": answer.content}, lp)
            elif body.include_stop_str_in_output and out.matched_stop:
                yield chunk(i, {"content": out.matched_stop})
            yield chunk(i, {}, None, reason)
