"""Request and response bodies: TGI's native API and the OpenAI API (pydantic, HTTP boundary only)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    # serde-like: wrong JSON types are 422s, not silently coerced; unknown fields are kept aside
    # (TGI's serde ignores them, vLLM warns) so `unknown_fields` can name them in a log line
    model_config = ConfigDict(extra="allow", strict=True)


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of every field the client sent that no model declares (nested models and lists too).

    Free-form models (`ContentPart`, `ResponseFormat`) read their extras, so they are not reported."""
    names = [] if getattr(model, "_free_form", False) else [prefix + k for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name, None)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                where = f"{prefix}{name}[{i}]." if isinstance(value, list) else f"{prefix}{name}."
                names += unknown_fields(item, where)
    return names


# ---- TGI ---------------------------------------------------------------------------------------


class Grammar(_Strict):
    type: Literal["json", "regex", "json_schema"]
    value: Any = None


class GenerateParameters(_Strict):
    best_of: int | None = Field(None, description="Generate best_of sequences and return the one with the highest log-probability")
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, description="Defaults to what fits in max_total_tokens (at most 1024)")
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = None
    watermark: bool = Field(False, description="Not supported: true is rejected")
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: Grammar | None = Field(
        None, description="Constrain the output: `json` (value: a JSON schema), `regex` (value: a pattern) or "
                          "`json_schema` (value: {name, schema})")
    adapter_id: str | None = Field(None, description="A LoRA adapter's name (--lora-adapters); none or the "
                                                     "model id: the base model")


class GenerateRequest(_Strict):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False
    add_special_tokens: bool = True


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(BestOfSequence):
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_top_n_tokens: int
    waiting_served_ratio: float
    max_batch_total_tokens: int | None = None
    max_waiting_tokens: int
    max_batch_size: int | None = None
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None
    load_format: str = "auto"  # genserve's: "dummy" when the weights are random (--load-format dummy)
    model_path_kind: str | None = None  # genserve's: "native" or "transformers" (the fallback) serves the model
    lora_adapters: list[str] | None = None  # genserve's: the LoRA adapters served by name


# ---- OpenAI ------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    _free_form = True
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # SDKs echo back assistant turns with `refusal`, `audio`, `annotations`: kept aside, not refused
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    _free_form = True
    type: str


class _SamplingFields(_Strict):
    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = Field(None, description="Extension (TGI/vLLM)")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias added to its logit, in [-100, 100]")
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="Extension (TGI/vLLM)")
    user: str | None = None
    # vLLM's extensions, for clients and benchmarks written against it
    ignore_eos: bool = Field(False, description="Extension (vLLM): keep generating past EOS")
    min_tokens: int = Field(0, description="Extension (vLLM): no EOS / stop_token_ids before this many tokens")
    stop_token_ids: list[int] | None = Field(None, description="Extension (vLLM): token ids that end the output")
    skip_special_tokens: bool = Field(True, description="Extension (vLLM): leave special tokens out of the text")
    response_format: ResponseFormat | None = Field(
        None, description="`text`, `json_object`, `json_schema` ({json_schema: {name, schema}}), or TGI's "
                          "`json` / `regex` ({value}); on /v1/completions an extension, as in vLLM")
    min_p: float | None = Field(None, description="Extension (vLLM): drop tokens below min_p x the top probability")
    include_stop_str_in_output: bool = Field(False, description="Extension (vLLM): keep the matched stop string")
    allowed_token_ids: list[int] | None = Field(None, description="Extension (vLLM): only these tokens may be generated")
    bad_words: list[str] | None = Field(None, description="Extension (vLLM): words that are never generated")
    prompt_logprobs: int | None = Field(
        None, description="Extension (vLLM): log-probabilities of the prompt tokens, with this many alternatives")
    truncate_prompt_tokens: int | None = Field(
        None, description="Extension (vLLM): keep only the last k prompt tokens (-1: as many as fit)")
    priority: int = Field(0, description="Extension (vLLM): lower first, with --scheduling-policy priority")


class _ChatTemplateFields(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Any] | None = Field(None, description="OpenAI function tools; the call is held to their schemas")
    tool_choice: Any = None
    tool_prompt: str | None = None
    add_generation_prompt: bool = Field(True, description="Extension (vLLM): end the prompt with the assistant's turn")
    continue_final_message: bool = Field(
        False, description="Extension (vLLM): continue the last (assistant) message instead of opening a new turn")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extension (vLLM): extra variables for the chat template")


class ChatCompletionRequest(_SamplingFields, _ChatTemplateFields):
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = Field(None, description="Not supported: rejected")
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None


class TokenizeChatRequest(_ChatTemplateFields):
    """vLLM's /v1/tokenize with `messages`: the chat template rendered, then tokenized."""

    model: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeCompletionRequest(_Strict):
    """vLLM's /v1/tokenize with `prompt`."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    parent: str | None = None  # vLLM's: a LoRA adapter's base model
    root: str | None = None  # vLLM's: the adapter's folder


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
