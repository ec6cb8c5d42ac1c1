"""Prompt log-probabilities: which prompt tokens a chunk scores, and their scores from its logits."""

from __future__ import annotations

import torch

from genserve.server.transfer import to_host

# (request id, prompt position of the first scored token, the scored token ids, top-n alternatives wanted)
PromptTarget = tuple[str, int, list[int], int]
# per request: (prompt position of the first scored token, log-probabilities, top-n (id, logprob) lists)
PromptScores = tuple[int, list[float], list[list[tuple[int, float]]]]
# rows of prompt logits turned into log-probabilities at a time: [rows, vocab] float copies stay small
SCORE_ROWS = 256


def prompt_target(request, begin: int, end: int) -> PromptTarget | None:
    """What a chunk of positions [begin, end) scores when the request asked for prompt log-probabilities:
    position j's logits score prompt token j + 1 (the last prompt position's logits sample instead)."""
    if not request.sampling_params.prompt_logprobs:  # every decode row asks, every step: answer cheaply
        return None
    scored_end = min(end, request.num_prompt_tokens - 1)
    if begin >= scored_end:
        return None
    return (request.request_id, begin + 1, request.token_ids[begin + 1:scored_end + 1],
            request.sampling_params.top_n_tokens)


def prompt_scores_on_device(logits: torch.Tensor | None, token_ids: torch.Tensor | None,
                            targets: list[PromptTarget]) -> torch.Tensor | None:
    """[R, 1 + 2k] float64 per scored row: the prompt token's log-probability, then k top ids and their
    log-probabilities (k: the largest top-n asked for), left on the device for the step's one copy out."""
    if logits is None:
        return None
    max_top = min(max(top_n for *_, top_n in targets), logits.shape[-1])
    chunks = []
    for start in range(0, logits.shape[0], SCORE_ROWS):
        rows = logits[start:start + SCORE_ROWS].float()
        lse = rows.logsumexp(-1)
        columns = [rows.gather(1, token_ids[start:start + SCORE_ROWS, None]) - lse[:, None]]
        if max_top:
            top_values, top_ids = rows.topk(max_top, dim=-1)
            columns += [top_ids, top_values - lse[:, None]]
        chunks.append(torch.cat([c.to(torch.float64) for c in columns], dim=1))
    return torch.cat(chunks)


def unpack_prompt_scores(rows: list[list[float]], targets: list[PromptTarget]) -> dict[str, PromptScores]:
    max_top = (len(rows[0]) - 1) // 2 if rows else 0
    scored, offset = {}, 0
    for request_id, first, ids, top_n in targets:
        mine = rows[offset:offset + len(ids)]
        offset += len(ids)
        alternatives = [list(zip(map(int, r[1:1 + top_n]), r[1 + max_top:1 + max_top + top_n], strict=True))
                        for r in mine] if top_n else []
        scored[request_id] = (first, [r[0] for r in mine], alternatives)
    return scored


def score_prompt_tokens(logits: torch.Tensor | None, targets: list[PromptTarget]) -> dict[str, PromptScores]:
    """Log-probability of each scored prompt token (and its top-n alternatives when asked), per request."""
    if logits is None:
        return {}
    token_ids = torch.tensor([t for _, _, ids, _ in targets for t in ids], device=logits.device)
    return unpack_prompt_scores(to_host([prompt_scores_on_device(logits, token_ids, targets)])[0], targets)
