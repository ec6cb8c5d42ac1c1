"""TGI's native routes: /generate, /generate_stream, /, /tokenize, /info, /health, /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from genserve.server.api.errors import validation_error
from genserve.server.api.generation import GenerationService, warn_unknown_fields
from genserve.server.api.protocol import (
    ErrorResponse,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Grammar,
    Info,
    SimpleToken,
    StreamResponse,
)
from genserve.server.api.record import AdmittedRequest, Job, RequestRecord, SequenceResult, best_sequence
from genserve.server.api.settings import server_version
from genserve.server.api.stream import SSEResponse, sse_event
from genserve.server.grammar import GrammarSpec
from genserve.server.outputs import RequestOutput, TokenInfo
from genserve.server.sampling_params import SamplingParams

router = APIRouter(tags=["Text Generation Inference"])
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "Payload over --payload-limit"},
    422: {"model": ErrorResponse, "description": "Input validation error"},
    424: {"model": ErrorResponse, "description": "Generation error"},
    429: {"model": ErrorResponse, "description": "Model is overloaded"},
}
STREAM_200 = {200: {"content": {"text/event-stream": {"schema": StreamResponse.model_json_schema()}},
                    "description": "One `data:` event per token; the last carries generated_text and details"}}


def service(request: Request) -> GenerationService:
    return request.app.state.service


def to_sampling_params(p: GenerateParameters, max_best_of: int, max_input_tokens: int, stream: bool) -> tuple[SamplingParams, int]:
    """TGI's validation order and messages; returns the params and `best_of`."""
    best_of = 1 if p.best_of is None else p.best_of
    sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    if best_of > 1 and not sampling:
        raise validation_error("you must use sampling when `best_of` is > 1")
    if p.temperature is not None and p.temperature <= 0:
        raise validation_error("`temperature` must be strictly positive")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise validation_error("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise validation_error("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise validation_error("`top_k` must be strictly positive")
    if p.seed is not None and best_of > 1:
        raise validation_error("`seed` must not be set when `best_of` > 1")
    if max_best_of == 1 and best_of != 1:
        raise validation_error("`best_of` != 1 is not allowed for this endpoint")
    if not 0 < best_of <= max_best_of:
        raise validation_error(f"`best_of` must be > 0 and <= {max_best_of}. Given: {best_of}")
    if stream and best_of != 1:
        raise validation_error("`best_of` != 1 is not supported when streaming tokens")
    if stream and p.decoder_input_details:
        raise validation_error("`decoder_input_details` == true is not supported when streaming tokens")
    if p.truncate is not None and not 0 < p.truncate <= max_input_tokens:
        raise validation_error(
            f"`truncate` must be strictly positive and less than {max_input_tokens}. Given: {p.truncate}"
        )
    if p.watermark:
        raise validation_error("`watermark` is not supported by genserve")
    grammar = tgi_grammar(p.grammar) if p.grammar is not None else None
    params = SamplingParams(
        max_new_tokens=p.max_new_tokens,
        # as TGI: a warper that changes nothing (temperature 1.0) leaves a request greedy
        do_sample=p.do_sample,
        temperature=1.0 if p.temperature is None else p.temperature,
        top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        typical_p=1.0 if p.typical_p is None else p.typical_p,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=p.seed,
        stop=list(p.stop),
        top_n_tokens=p.top_n_tokens or 0,
        grammar=grammar,
        prompt_logprobs=p.decoder_input_details,
        adapter_id=p.adapter_id or None,  # checked once, at admission (engine.validate)
    )
    return params, best_of


def tgi_grammar(grammar: Grammar) -> GrammarSpec:
    """TGI's `parameters.grammar`: {type: json, value: schema}, {type: regex, value: pattern} or
    {type: json_schema, value: {name, schema}}."""
    try:
        if grammar.type == "json":
            return GrammarSpec.json_schema(grammar.value)
        if grammar.type == "json_schema":
            value = grammar.value
            if not isinstance(value, dict) or "schema" not in value:
                raise ValueError("grammar is not valid: `json_schema` needs a value with a `schema`")
            return GrammarSpec.json_schema(value["schema"])
        return GrammarSpec.regex(grammar.value)
    except ValueError as e:
        raise validation_error(str(e)) from None


def token_json(t: TokenInfo) -> dict:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


def top_tokens_json(t: TokenInfo) -> list[dict]:
    return [{"id": x.id, "text": x.text, "logprob": x.logprob, "special": x.special} for x in t.top_tokens]


def tgi_text(seq: SequenceResult) -> str:
    # TGI keeps the matched stop sequence at the end of generated_text
    return seq.text + (seq.matched_stop or "")


def sequence_json(svc: GenerationService, seq: SequenceResult, req: GenerateRequest, ids: list[int], sampled: bool) -> dict:
    p = req.parameters
    out = {
        "generated_text": (req.inputs if p.return_full_text else "") + tgi_text(seq),
        "finish_reason": seq.finish_reason,
        "generated_tokens": seq.num_generated_tokens,
        "seed": seq.seed if sampled else None,
        "prefill": [],
        "tokens": [token_json(t) for t in seq.tokens],
    }
    if p.decoder_input_details:
        logprobs = seq.prompt_logprobs or [None] * len(ids)
        out["prefill"] = [{"id": i, "text": svc.tokenizer.decode([i]), "logprob": lp}
                          for i, lp in zip(ids, logprobs, strict=True)]
    if p.top_n_tokens:
        out["top_tokens"] = [top_tokens_json(t) for t in seq.tokens]
    return out


async def admit(svc: GenerationService, record: RequestRecord, req: GenerateRequest, stream: bool) -> AdmittedRequest:
    """TGI's body -> jobs (best_of copies), admitted once."""
    cfg = svc.config
    params, best_of = to_sampling_params(req.parameters, cfg.max_best_of, cfg.max_input_tokens, stream)
    svc.check_params(params)
    ids = await svc.encode(req.inputs, add_special_tokens=req.add_special_tokens)
    if req.parameters.truncate is not None:
        ids = ids[-req.parameters.truncate:]
    jobs = [Job(ids, params if best_of == 1 else replace(params, seed=None)) for _ in range(best_of)]
    return await svc.admit(record, jobs, count_best_only=True)


async def generate_json(request: Request, req: GenerateRequest, route: str) -> tuple[dict, dict[str, str]]:
    svc = service(request)
    async with svc.opening(request, route, req) as record:
        admitted = await admit(svc, record, req, stream=False)
        results = await svc.run(admitted, request.receive)
    best = best_sequence(results)
    ids, params = admitted.jobs[0].prompt_ids, admitted.jobs[0].params
    body: dict = {"generated_text": (req.inputs if req.parameters.return_full_text else "") + tgi_text(best)}
    if req.parameters.details or req.parameters.decoder_input_details:
        sampled = not params.is_greedy
        details = sequence_json(svc, best, req, ids, sampled)
        details.pop("generated_text")
        if len(results) > 1:
            details["best_of_sequences"] = [sequence_json(svc, s, req, ids, sampled) for s in results if s is not best]
        body["details"] = details
    return body, record.headers(svc.compute_type)


async def _generate_stream(request: Request, req: GenerateRequest, route: str) -> SSEResponse:
    svc = service(request)
    async with svc.opening(request, route, req) as record:
        admitted = await admit(svc, record, req, stream=True)
    return svc.sse(admitted, lambda outputs: _tgi_events(svc, req, admitted, outputs),
                   lambda error: sse_event(error.body()))


async def _tgi_events(svc: GenerationService, req: GenerateRequest, admitted: AdmittedRequest,
                      outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[bytes]:
    """TGI's events: one per token; the last carries generated_text (and details)."""
    params, num_prompt = admitted.jobs[0].params, len(admitted.jobs[0].prompt_ids)
    index = 0
    async for _, out in outputs:
        tokens = out.new_tokens
        if out.finished and not tokens:
            # nothing new in the last step: close with an empty special token carrying the end
            tokens = [TokenInfo(id=svc.eos_token_id, text="", logprob=0.0, special=True)]
        for k, tok in enumerate(tokens):
            index += 1
            event: dict = {"index": index, "token": token_json(tok), "generated_text": None, "details": None}
            if params.top_n_tokens:
                event["top_tokens"] = top_tokens_json(tok)
            if out.finished and k == len(tokens) - 1:
                text = (out.generated_text or "") + (out.matched_stop or "")
                event["generated_text"] = (req.inputs if req.parameters.return_full_text else "") + text
                if req.parameters.details:
                    event["details"] = {
                        "finish_reason": out.finish_reason,
                        "generated_tokens": out.num_generated_tokens,
                        "seed": out.seed if not params.is_greedy else None,
                        "input_length": num_prompt,
                    }
            yield sse_event(event)


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS, response_model_exclude_none=True)
async def generate(req: GenerateRequest, request: Request) -> JSONResponse:
    """Generate text for `inputs`; `details` adds tokens, log-probabilities and the finish reason."""
    body, headers = await generate_json(request, req, "/generate")
    return JSONResponse(body, headers=headers)


@router.post("/generate_stream", responses={**STREAM_200, **ERRORS})
async def generate_stream(req: GenerateRequest, request: Request) -> SSEResponse:
    """Stream one Server-Sent Event per generated token."""
    return await _generate_stream(request, req, "/generate_stream")


@router.post("/", responses={200: {"model": list[GenerateResponse]}, **ERRORS})
async def compat_generate(req: GenerateRequest, request: Request) -> Response:
    """`/generate` (answer wrapped in a list) or `/generate_stream` when `stream` is true."""
    if req.stream:
        return await _generate_stream(request, req, "/")
    body, headers = await generate_json(request, req, "/")
    return JSONResponse([body], headers=headers)


@router.post("/tokenize", response_model=list[SimpleToken], responses=ERRORS)
async def tokenize(req: GenerateRequest, request: Request) -> JSONResponse:
    """Tokenize `inputs`: ids with their character offsets."""
    svc = service(request)
    warn_unknown_fields("/tokenize", req)
    try:
        req.inputs.encode("utf-8")
    except UnicodeEncodeError as e:
        raise validation_error(f"`inputs` is not valid UTF-8: {e.reason}") from None
    enc = svc.tokenizer(req.inputs, add_special_tokens=req.add_special_tokens, return_offsets_mapping=True)
    return JSONResponse([
        {"id": i, "text": req.inputs[a:b], "start": a, "stop": b}
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ])


def _kv_capacity(engine) -> int | None:
    try:
        return engine.stats().num_kv_blocks_total * engine.config.block_size
    except Exception:
        return None


def _model_sha(engine) -> str | None:
    # a Hub snapshot folder is named after its commit
    folder = engine.model_dir
    if folder is not None and folder.parent.name == "snapshots":
        return folder.name
    return None


def info_json(request: Request) -> dict:
    svc = service(request)
    cfg, s, engine = svc.config, svc.settings, svc.engine
    return Info(
        model_id=str(engine.model_id),
        model_sha=s.model_sha or _model_sha(engine),
        model_dtype=str(engine.dtype),
        model_device_type=str(engine.device).split(":")[0],
        model_pipeline_tag="text-generation",
        max_concurrent_requests=s.max_concurrent_requests,
        max_best_of=cfg.max_best_of,
        max_stop_sequences=cfg.max_stop_sequences,
        max_input_tokens=cfg.max_input_tokens,
        max_total_tokens=cfg.max_total_tokens,
        max_top_n_tokens=cfg.max_top_n_tokens,
        waiting_served_ratio=cfg.waiting_served_ratio,
        max_batch_total_tokens=cfg.max_batch_total_tokens or _kv_capacity(engine),
        max_waiting_tokens=cfg.max_waiting_tokens,
        max_batch_size=cfg.max_batch_size,
        validation_workers=s.validation_workers,
        max_client_batch_size=s.max_client_batch_size,
        router="genserve",
        version=server_version(),
        sha=s.sha,
        docker_label=s.docker_label,
        load_format=cfg.load_format,
        model_path_kind=engine.model_path_kind,
        lora_adapters=engine.adapters.names,
    ).model_dump()


@router.get("/info", response_model=Info)
async def info(request: Request) -> JSONResponse:
    """The served model and the server's limits."""
    return JSONResponse(info_json(request))


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(request: Request) -> Response:
    """200 once the model is loaded and warmed up, 503 before."""
    engine = service(request).engine
    if engine.is_ready and engine.error is None:
        return Response(status_code=200)
    return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)


@router.get("/", include_in_schema=False)
async def root_health(request: Request) -> Response:
    return await health(request)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics (TGI's names plus genserve_*)."""
    return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)
