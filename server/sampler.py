"""Batched sampling for one engine step: penalties, warpers, per-request seeded draws."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.server.grammar import GrammarMatcher, allowed_token_mask, fill_bitmasks
from genserve.server.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None  # per-request, seeded; None for greedy
    token_ids: list[int]  # prompt + generated so far (for penalties)
    num_prompt_tokens: int
    grammar: GrammarMatcher | None = None  # tokens outside the grammar get -inf before anything else
    eos_token_ids: frozenset[int] = frozenset()  # held back, with stop_token_ids, until min_tokens

    @property
    def holds_back_stops(self) -> bool:
        return len(self.token_ids) - self.num_prompt_tokens < self.params.min_tokens


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log_softmax of the raw logits at the chosen token
    top_tokens: list[list[tuple[int, float]]]  # top_n_tokens (id, logprob) per row, [] when 0


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)
    return generator


def _has_repetition_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0


def _has_output_penalty(p: SamplingParams) -> bool:
    return p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        """Pick one token per row of `logits` [N, V]; a row's draw depends only on its logits and generator."""
        assert logits.shape[0] == len(rows)
        raw = logits.float()
        if any(r.params.logit_bias for r in rows):
            raw = apply_logit_bias(raw, rows)
        if any(r.holds_back_stops for r in rows):
            raw = hold_back_stops(raw, rows)
        if any(r.grammar is not None for r in rows):
            # masked first: penalties, warpers, greedy and the reported logprobs all see the constrained logits
            raw = apply_grammars(raw, rows)
        params = [r.params for r in rows]
        lse = torch.logsumexp(raw, dim=-1)

        if all(p.is_greedy and not _has_repetition_penalty(p) and not _has_output_penalty(p) for p in params):
            # (logit_bias and grammars are already in `raw`)
            ids = raw.argmax(dim=-1)
        else:
            ids = self._choose(raw, rows)

        logprobs = raw.gather(1, ids[:, None]).squeeze(1) - lse
        max_top_n = max(p.top_n_tokens for p in params)
        top_tokens: list[list[tuple[int, float]]] = [[] for _ in rows]
        if max_top_n > 0:
            top_values, top_ids = (raw - lse[:, None]).topk(min(max_top_n, raw.shape[-1]), dim=-1)
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
            for i, p in enumerate(params):
                n = p.top_n_tokens
                top_tokens[i] = list(zip(top_ids[i][:n], top_values[i][:n], strict=True))
        return SampleResult(token_ids=ids.tolist(), logprobs=logprobs.tolist(), top_tokens=top_tokens)

    def _choose(self, raw: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        scores = apply_penalties(raw, rows)
        ids = scores.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if sampled:
            idx = torch.tensor(sampled, device=raw.device)
            sub_rows = [rows[i] for i in sampled]
            probs = _warped_probs(scores[idx], [r.params for r in sub_rows])
            ids[idx] = _draw(probs, [r.generator for r in sub_rows])
        return ids


def apply_logit_bias(raw: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """OpenAI's logit_bias: each listed token's logit moves by its bias (-100 bans it, +100 all but forces it)."""
    row_idx = [i for i, r in enumerate(rows) for _ in r.params.logit_bias]
    token_ids = [t for r in rows for t in r.params.logit_bias]
    biases = [b for r in rows for b in r.params.logit_bias.values()]
    biased = raw.clone()
    biased.index_put_((torch.tensor(row_idx, device=raw.device), torch.tensor(token_ids, device=raw.device)),
                      raw.new_tensor(biases), accumulate=True)
    return biased


def hold_back_stops(raw: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """-inf for EOS and stop_token_ids in rows still short of min_tokens (as HF's min_new_tokens)."""
    pairs = [(i, t) for i, r in enumerate(rows) if r.holds_back_stops
             for t in sorted(r.eos_token_ids | set(r.params.stop_token_ids)) if t < raw.shape[-1]]
    if not pairs:
        return raw
    held = raw.clone()
    held[torch.tensor([i for i, _ in pairs]), torch.tensor([t for _, t in pairs])] = float("-inf")
    return held


def apply_grammars(raw: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """-inf for every token a row's grammar does not allow next; rows without a grammar are untouched."""
    constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
    bitmask = torch.zeros(len(constrained), rows[constrained[0]].grammar.num_words, dtype=torch.int32)
    fill_bitmasks([rows[i].grammar for i in constrained], bitmask)
    disallowed = ~allowed_token_mask(bitmask, raw.shape[-1]).to(raw.device)
    if len(constrained) == len(rows):  # every row constrained: one masked copy, no gather/scatter
        return raw.masked_fill(disallowed, float("-inf"))
    index = torch.tensor(constrained, device=raw.device)
    masked = raw.clone()
    masked[index] = raw[index].masked_fill(disallowed, float("-inf"))
    return masked


def apply_penalties(raw: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (HF, prompt + output) then frequency/presence (OpenAI, output only); touches only seen ids."""
    scores = raw
    rep = [(i, r.token_ids) for i, r in enumerate(rows) if _has_repetition_penalty(r.params)]
    if rep:
        scores = scores.clone()
        row_idx, ids = _flat_positions(raw, rep)
        penalty = raw.new_tensor([r.params.repetition_penalty for r in rows])[row_idx]
        # duplicates all write the same value, so each seen id is penalised once
        seen = scores[row_idx, ids]
        scores[row_idx, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    out = [(i, r.token_ids[r.num_prompt_tokens :]) for i, r in enumerate(rows) if _has_output_penalty(r.params)]
    if out:
        if scores is raw:
            scores = scores.clone()
        row_idx, ids = _flat_positions(raw, out)
        frequency = raw.new_tensor([r.params.frequency_penalty for r in rows])[row_idx]
        presence = raw.new_tensor([r.params.presence_penalty for r in rows])[row_idx]
        scores.index_put_((row_idx, ids), -frequency, accumulate=True)
        scores[row_idx, ids] = scores[row_idx, ids] - presence
    return scores


def _flat_positions(raw: torch.Tensor, token_lists: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs for every token, dropping ids beyond the logits' vocab (padded embeddings)."""
    ids = torch.tensor([t for _, tokens in token_lists for t in tokens], dtype=torch.long)
    row_idx = torch.tensor([i for i, tokens in token_lists for _ in tokens], dtype=torch.long)
    keep = ids < raw.shape[-1]
    return row_idx[keep].to(raw.device), ids[keep].to(raw.device)


def _warped_probs(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top_k, top_p, typical_p in TGI/HF order, then softmax. scores: [S, V]."""
    temperature = scores.new_tensor([p.temperature for p in params])[:, None]
    scores = scores / temperature
    if any(p.top_p < 1.0 for p in params):
        scores = _top_k_top_p(scores, params)
    elif any(p.top_k > 0 for p in params):
        scores = _top_k(scores, params)
    if any(p.typical_p < 1.0 for p in params):
        scores = _typical(scores, params)
    return scores.softmax(dim=-1)


def _top_k(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    # a partial topk is much cheaper than the full sort top_p needs
    vocab = scores.shape[-1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    values = scores.topk(max(top_k), dim=-1).values
    kth = values.gather(1, torch.tensor(top_k, device=scores.device)[:, None] - 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_k_top_p(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = scores.shape[-1]
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=scores.device)
    # like HF, ties with the k-th value stay in
    kth = sorted_scores.gather(1, (top_k - 1)[:, None])
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    top_p = scores.new_tensor([p.top_p for p in params])[:, None]
    probs = sorted_scores.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # HF drops a token when the mass strictly above it already reaches top_p; the first token always stays
    drop = (mass_before >= top_p) & (top_p < 1.0)
    drop[:, 0] = False
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, sorted_scores)


def _typical(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """HF TypicalLogitsWarper, per-row mass; rows with typical_p == 1 pass through."""
    mass = scores.new_tensor([p.typical_p for p in params])[:, None]
    normalized = scores.log_softmax(dim=-1)
    entropy = -(normalized * normalized.exp()).nansum(dim=-1, keepdim=True)
    shifted = (-normalized - entropy).abs()
    sorted_shifted, order = shifted.sort(dim=-1)
    cumulative = scores.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1, keepdim=True).clamp_(max=scores.shape[-1] - 1)
    drop = sorted_shifted > sorted_shifted.gather(1, last)
    drop[:, 0] = False
    drop &= mass < 1.0
    return scores.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Inverse-CDF draw: one uniform per row from that row's own generator, so batching never changes it."""
    # 1 - U[0,1) lies in (0, 1], so the chosen id always has nonzero probability
    uniforms = [1.0 - torch.rand(1, generator=g, device=g.device if g else "cpu").item() for g in generators]
    cdf = probs.cumsum(dim=-1)
    target = probs.new_tensor(uniforms)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target).squeeze(1)
    return ids.clamp_(max=probs.shape[-1] - 1)
