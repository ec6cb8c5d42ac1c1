"""What the OpenAI routes share: parameters from a body, logprobs and usage layouts, the envelope, and
the end of a stream (usage chunk, [DONE])."""

from __future__ import annotations

from dataclasses import replace

from genserve.server.api.errors import APIError, validation_error
from genserve.server.api.generation import GenerationService
from genserve.server.api.protocol import ResponseFormat, _SamplingFields
from genserve.server.api.record import RequestRecord, derive_seeds
from genserve.server.api.settings import server_version
from genserve.server.api.stream import DONE, sse_event
from genserve.server.api.vllm_extensions import extension_params
from genserve.server.grammar import GrammarSpec
from genserve.server.outputs import TokenInfo, TopToken
from genserve.server.sampling_params import SamplingParams

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
        # vLLM: `model` names a LoRA adapter; any other name (the model id, none) is the base model
        adapter_id=body.model if body.model in svc.engine.adapters else None,
        **extensions,
    )
    svc.check_params(base)
    return [replace(base, seed=seed, stop=list(stop)) for seed in derive_seeds(body.seed, n)]


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


def envelope(svc: GenerationService, kind: str, rid: str, created: int, adapter: str | None = None) -> dict:
    """The fields every OpenAI answer and chunk carries; `model` names the adapter that served it (vLLM)."""
    return {"id": rid, "object": kind, "created": created, "model": adapter or str(svc.engine.model_id),
            "system_fingerprint": f"{server_version()}-native"}


def usage(num_prompt: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": completion_tokens,
            "total_tokens": num_prompt + completion_tokens}



def error_event(error: APIError) -> bytes:
    return sse_event(error.body())


def stream_closing(envelope_: dict, include_usage: bool):
    """After the chunks (or an error event): the usage chunk when asked for, then [DONE]."""
    def closing(record: RequestRecord) -> list[bytes]:
        events = []
        if include_usage and record.status == 200:
            events.append(sse_event({**envelope_, "choices": [],
                                     "usage": usage(record.num_prompt_tokens, record.num_generated_tokens)}))
        return [*events, DONE]
    return closing
