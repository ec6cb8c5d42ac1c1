"""vLLM's common extensions to the OpenAI bodies: min_p, allowed_token_ids, bad_words, priority,
prompt_logprobs, truncate_prompt_tokens, include_stop_str_in_output (checked here, 422 on bad values)."""

from __future__ import annotations

from genserve.server.api.errors import validation_error
from genserve.server.outputs import TopToken


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Each word as tokens, alone and after a space (as vLLM: the spaced form only when it is another
    token sequence of the same length, i.e. the word's mid-sentence spelling)."""
    out: list[list[int]] = []
    for word in words:
        word = word.strip()
        if not word:
            raise validation_error("`bad_words` must not contain empty words")
        plain = tokenizer.encode(word, add_special_tokens=False)
        out.append(plain)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(spaced) == len(plain) and spaced != plain:
            out.append(spaced)
    return out


def extension_params(body, svc, top_n_tokens: int) -> dict:
    """SamplingParams fields from the extensions, checked against the server's limits."""
    cfg = svc.config
    if body.priority != 0 and cfg.scheduling_policy != "priority":
        raise validation_error("`priority` needs the server started with `--scheduling-policy priority`")
    prompt_logprobs = body.prompt_logprobs
    if prompt_logprobs is not None:
        if body.stream:
            raise validation_error("`prompt_logprobs` is not available when `stream` is true")
        if not 0 <= prompt_logprobs <= cfg.max_top_n_tokens:
            raise validation_error(
                f"`prompt_logprobs` must be >= 0 and <= {cfg.max_top_n_tokens}. Given: {prompt_logprobs}")
        top_n_tokens = max(top_n_tokens, prompt_logprobs)
    check_truncation(body.truncate_prompt_tokens, cfg.max_input_tokens)
    return {
        "min_p": 0.0 if body.min_p is None else body.min_p,
        "allowed_token_ids": None if body.allowed_token_ids is None else list(body.allowed_token_ids),
        "bad_words_token_ids": bad_words_token_ids(svc.tokenizer, body.bad_words or []),
        "priority": body.priority,
        "prompt_logprobs": prompt_logprobs is not None,
        "top_n_tokens": top_n_tokens,
    }


def check_truncation(k: int | None, max_input_tokens: int) -> None:
    if k is not None and not (k == -1 or 1 <= k <= max_input_tokens):
        raise validation_error(
            f"`truncate_prompt_tokens` must be -1 or >= 1 and <= {max_input_tokens}. Given: {k}")


def truncate_prompt(ids: list[int], k: int | None, max_input_tokens: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the last k tokens (-1: the last max_input_tokens)."""
    if k is None:
        return ids
    keep = max_input_tokens if k == -1 else k
    return ids[-keep:]


def with_stop_string(text: str, matched_stop: str | None, include: bool) -> str:
    return text + (matched_stop or "") if include else text


def prompt_logprobs_json(prompt_ids: list[int], logprobs: list[float | None] | None,
                         tops: list[list[TopToken]] | None, n: int, tokenizer) -> list[dict | None]:
    """vLLM's layout: None for the first token, then {token id: {logprob, rank, decoded_token}} with the
    prompt's own token and the n most likely; rank is known within the top n (None beyond)."""
    out: list[dict | None] = [None]
    for k in range(1, len(prompt_ids)):
        token = prompt_ids[k]
        alternatives = (tops[k] if tops else [])[:n]
        entry = {str(t.id): {"logprob": t.logprob, "rank": r + 1, "decoded_token": t.text}
                 for r, t in enumerate(alternatives)}
        if str(token) not in entry:
            lp = logprobs[k] if logprobs else None
            entry = {str(token): {"logprob": lp, "rank": None, "decoded_token": tokenizer.decode([token])}, **entry}
        out.append(entry)
    return out
