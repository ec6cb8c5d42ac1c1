"""Batched sampling for one engine step: penalties, warpers, per-request seeded draws, logprobs.

A step's sampling copies to the device once (every row's parameters and token lists, in one
HostBatch) and back once (ids, log-probabilities and top-n, packed by `PendingSample`); seeded
draws stay on the device, one uniform per row from that row's own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.server import kernels
from genserve.server.grammar import GrammarMatcher, allowed_token_mask, fill_bitmasks
from genserve.server.sampling_params import SamplingParams
from genserve.server.stopping import holds_back_stops
from genserve.server.transfer import HostBatch, to_host


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
        return holds_back_stops(len(self.token_ids) - self.num_prompt_tokens, self.params)

    def banned_token_ids(self) -> set[int]:
        """vLLM's bad_words: a word's last token, where the output so far ends with the tokens before it."""
        if not self.params.bad_words_token_ids:
            return set()
        output = self.token_ids[self.num_prompt_tokens:]
        banned = set()
        for word in self.params.bad_words_token_ids:
            prefix = word[:-1]
            if len(prefix) <= len(output) and output[len(output) - len(prefix):] == prefix:
                banned.add(word[-1])
        return banned


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log_softmax of the raw logits at the chosen token
    top_tokens: list[list[tuple[int, float]]]  # top_n_tokens (id, logprob) per row, [] when 0


@dataclass(slots=True)
class PendingSample:
    """A step's draws still on the device: packed [N, 2 + 2k] = id, logprob, k top ids, k top logprobs."""

    packed: torch.Tensor
    top_n: list[int]

    def result(self, rows: list[list[float]]) -> SampleResult:
        k = (len(rows[0]) - 2) // 2 if rows else 0
        tops = [list(zip(map(int, r[2:2 + n]), r[2 + k:2 + k + n], strict=True)) for r, n in
                zip(rows, self.top_n, strict=True)]
        return SampleResult(token_ids=[int(r[0]) for r in rows], logprobs=[r[1] for r in rows], top_tokens=tops)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)
    return generator


def _has_repetition_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0


def _has_output_penalty(p: SamplingParams) -> bool:
    return p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _argmax_picks(p: SamplingParams) -> bool:
    """The token is the logits' argmax (after any masks): greedy, with no penalty reshaping the scores."""
    return p.is_greedy and not _has_repetition_penalty(p) and not _has_output_penalty(p)


def plain_greedy(row: SamplingRow) -> bool:
    """An argmax pick with nothing masked and nothing reported beyond the chosen token's logprob."""
    p = row.params
    return (_argmax_picks(p) and row.grammar is None and p.top_n_tokens == 0 and not row.holds_back_stops
            and not p.logit_bias and not p.allowed_token_ids and not p.bad_words_token_ids)


class SamplerInputs:
    """Every row's host-side sampling inputs, copied to the device in one transfer.

    Index pairs are (row, token id) with ids beyond the logits' vocab dropped (padded embeddings);
    per-row values are indexed by row on the device.
    """

    def __init__(self, rows: list[SamplingRow], vocab: int, device: torch.device) -> None:
        params = [r.params for r in rows]
        batch = HostBatch()
        parts: dict[str, int] = {}

        def add(name: str, values: list, dtype: torch.dtype = torch.float32) -> None:
            parts[name] = batch.add(values, dtype)

        if any(p.logit_bias for p in params):
            add("bias_rows", [i for i, p in enumerate(params) for _ in p.logit_bias], torch.long)
            add("bias_ids", [t for p in params for t in p.logit_bias], torch.long)
            add("bias_values", [b for p in params for b in p.logit_bias.values()])
        banned = [(i, t) for i, r in enumerate(rows) for t in r.banned_token_ids() if t < vocab]
        if banned:
            add("ban_rows", [i for i, _ in banned], torch.long)
            add("ban_ids", [t for _, t in banned], torch.long)
        allowed = [(i, t) for i, p in enumerate(params) if p.allowed_token_ids for t in p.allowed_token_ids
                   if t < vocab]
        if allowed:
            add("allow_rows", [i for i, _ in allowed], torch.long)
            add("allow_ids", [t for _, t in allowed], torch.long)
            add("restricted", [bool(p.allowed_token_ids) for p in params], torch.bool)
        stops = [(i, t) for i, r in enumerate(rows) if r.holds_back_stops
                 for t in sorted(r.eos_token_ids | set(r.params.stop_token_ids)) if t < vocab]
        if stops:
            add("stop_rows", [i for i, _ in stops], torch.long)
            add("stop_ids", [t for _, t in stops], torch.long)
        rep = [(i, r.token_ids) for i, r in enumerate(rows) if _has_repetition_penalty(r.params)]
        if rep:
            add("rep_rows", [i for i, tokens in rep for t in tokens if t < vocab], torch.long)
            add("rep_ids", [t for _, tokens in rep for t in tokens if t < vocab], torch.long)
            add("repetition", [p.repetition_penalty for p in params])
        out = [(i, r.token_ids[r.num_prompt_tokens:]) for i, r in enumerate(rows) if _has_output_penalty(r.params)]
        if out:
            add("out_rows", [i for i, tokens in out for t in tokens if t < vocab], torch.long)
            add("out_ids", [t for _, tokens in out for t in tokens if t < vocab], torch.long)
            add("frequency", [p.frequency_penalty for p in params])
            add("presence", [p.presence_penalty for p in params])
        constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
        if constrained and len(constrained) < len(rows):
            add("grammar_rows", constrained, torch.long)
        self.sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if self.sampled:
            warped = [params[i] for i in self.sampled]
            self.top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in warped]
            add("sampled_rows", self.sampled, torch.long)
            add("temperature", [p.temperature for p in warped])
            add("top_k_values", self.top_k, torch.long)
            add("top_p", [p.top_p for p in warped])
            add("typical_p", [p.typical_p for p in warped])
            add("min_p", [p.min_p for p in warped])
        tensors = batch.to(device)
        for name, index in parts.items():
            setattr(self, name, tensors[index])
        self.names = frozenset(parts)

    def has(self, name: str) -> bool:
        return name in self.names


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        """Pick one token per row of `logits` [N, V]; a row's draw depends only on its logits and generator."""
        pending = self.sample(logits, rows)
        return pending.result(to_host([pending.packed])[0])

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> PendingSample:
        """As __call__, leaving the result on the device for the step's one transfer back."""
        assert logits.shape[0] == len(rows)
        raw = logits.float()
        if raw.device.type == "cpu" and all(map(plain_greedy, rows)) and kernels.load_cpu_kernels():
            # the common case (greedy, nothing to mask or report beyond the logprob): one native call, the same
            # packed result the general path below gives; a step's Python here is time the CPUs decode nothing
            return PendingSample(kernels.greedy_pick(raw)[0], [0] * len(rows))
        inputs = SamplerInputs(rows, raw.shape[-1], raw.device)
        if inputs.has("bias_rows"):
            # OpenAI's logit_bias: -100 bans a token, +100 all but forces it
            raw = raw.index_put((inputs.bias_rows, inputs.bias_ids), inputs.bias_values, accumulate=True)
        if inputs.has("allow_rows"):
            # vLLM's allowed_token_ids: every other token of a restricted row is -inf
            keep = torch.zeros_like(raw, dtype=torch.bool)
            keep[inputs.allow_rows, inputs.allow_ids] = True
            raw = raw.masked_fill(~keep & inputs.restricted[:, None], float("-inf"))
        if inputs.has("ban_rows"):
            raw = raw.index_put((inputs.ban_rows, inputs.ban_ids), raw.new_full(inputs.ban_rows.shape, float("-inf")))
        if inputs.has("stop_rows"):
            # EOS and stop_token_ids held back in rows still short of min_tokens (as HF's min_new_tokens)
            raw = raw.index_put((inputs.stop_rows, inputs.stop_ids), raw.new_full(inputs.stop_rows.shape, float("-inf")))
        if any(r.grammar is not None for r in rows):
            # masked first: penalties, warpers, greedy and the reported logprobs all see the constrained logits
            raw = apply_grammars(raw, rows, inputs.grammar_rows if inputs.has("grammar_rows") else None)
        params = [r.params for r in rows]
        greedy = all(map(_argmax_picks, params))
        if greedy and raw.device.type == "cpu" and kernels.load_cpu_kernels():
            # (logit_bias and grammars are already in `raw`)
            picked, lse = kernels.greedy_pick(raw)
            columns = [picked]
        else:
            lse = torch.logsumexp(raw, dim=-1)
            ids = raw.argmax(dim=-1) if greedy else self._choose(raw, rows, inputs)
            logprobs = raw.gather(1, ids[:, None]).squeeze(1) - lse
            columns = [ids[:, None].to(torch.float64), logprobs[:, None].to(torch.float64)]
        max_top_n = min(max(p.top_n_tokens for p in params), raw.shape[-1])
        if max_top_n > 0:
            top_values, top_ids = (raw - lse[:, None]).topk(max_top_n, dim=-1)
            columns += [top_ids.to(torch.float64), top_values.to(torch.float64)]
        return PendingSample(torch.cat(columns, dim=1), [p.top_n_tokens for p in params])

    def _choose(self, raw: torch.Tensor, rows: list[SamplingRow], inputs: SamplerInputs) -> torch.Tensor:
        scores = _penalized(raw, inputs)
        ids = scores.argmax(dim=-1)
        if inputs.sampled:
            idx = inputs.sampled_rows
            probs = _warped_probs(scores[idx], [rows[i].params for i in inputs.sampled], inputs)
            ids[idx] = _draw(probs, [rows[i].generator for i in inputs.sampled])
        return ids


def apply_grammars(raw: torch.Tensor, rows: list[SamplingRow], index: torch.Tensor | None = None) -> torch.Tensor:
    """-inf for every token a row's grammar does not allow next; rows without a grammar are untouched
    (`index`: the constrained rows on the device, when not every row is)."""
    constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
    bitmask = torch.zeros(len(constrained), rows[constrained[0]].grammar.num_words, dtype=torch.int32)
    fill_bitmasks([rows[i].grammar for i in constrained], bitmask)
    disallowed = ~allowed_token_mask(bitmask, raw.shape[-1]).to(raw.device, non_blocking=True)
    if len(constrained) == len(rows):  # every row constrained: one masked copy, no gather/scatter
        return raw.masked_fill(disallowed, float("-inf"))
    if index is None:
        index = torch.tensor(constrained, device=raw.device)
    masked = raw.clone()
    masked[index] = raw[index].masked_fill(disallowed, float("-inf"))
    return masked


def apply_penalties(raw: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (HF, prompt + output) then frequency/presence (OpenAI, output only); touches only seen ids."""
    return _penalized(raw, SamplerInputs(rows, raw.shape[-1], raw.device))


def _penalized(raw: torch.Tensor, inputs: SamplerInputs) -> torch.Tensor:
    scores = raw
    if inputs.has("rep_rows"):
        scores = scores.clone()
        row_idx, ids = inputs.rep_rows, inputs.rep_ids
        penalty = inputs.repetition[row_idx]
        # duplicates all write the same value, so each seen id is penalised once
        seen = scores[row_idx, ids]
        scores[row_idx, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    if inputs.has("out_rows"):
        if scores is raw:
            scores = scores.clone()
        row_idx, ids = inputs.out_rows, inputs.out_ids
        scores.index_put_((row_idx, ids), -inputs.frequency[row_idx], accumulate=True)
        scores[row_idx, ids] = scores[row_idx, ids] - inputs.presence[row_idx]
    return scores


def _warped_probs(scores: torch.Tensor, params: list[SamplingParams], inputs: SamplerInputs) -> torch.Tensor:
    """Temperature, top_k, top_p, min_p, typical_p in HF's order, then softmax. scores: [S, V]."""
    scores = scores / inputs.temperature[:, None]
    if any(p.top_p < 1.0 for p in params):
        scores = _top_k_top_p(scores, inputs)
    elif any(p.top_k > 0 for p in params):
        scores = _top_k(scores, inputs)
    if any(p.min_p > 0.0 for p in params):
        scores = _min_p(scores, inputs.min_p[:, None])
    if any(p.typical_p < 1.0 for p in params):
        scores = _typical(scores, inputs.typical_p[:, None])
    return scores.softmax(dim=-1)


def _top_k(scores: torch.Tensor, inputs: SamplerInputs) -> torch.Tensor:
    # a partial topk is much cheaper than the full sort top_p needs
    values = scores.topk(max(inputs.top_k), dim=-1).values
    kth = values.gather(1, inputs.top_k_values[:, None] - 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_k_top_p(scores: torch.Tensor, inputs: SamplerInputs) -> torch.Tensor:
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    # like HF, ties with the k-th value stay in
    kth = sorted_scores.gather(1, inputs.top_k_values[:, None] - 1)
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    top_p = inputs.top_p[:, None]
    probs = sorted_scores.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # HF drops a token when the mass strictly above it already reaches top_p; the first token always stays
    drop = (mass_before >= top_p) & (top_p < 1.0)
    drop[:, 0].fill_(False)
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, sorted_scores)


def _min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """HF MinPLogitsWarper, per-row min_p [S, 1]: drop tokens below min_p x the top probability
    (the top token always stays; rows with min_p 0 pass through)."""
    probs = scores.softmax(dim=-1)
    return scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def _typical(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """HF TypicalLogitsWarper, per-row mass [S, 1]; rows with typical_p == 1 pass through."""
    normalized = scores.log_softmax(dim=-1)
    entropy = -(normalized * normalized.exp()).nansum(dim=-1, keepdim=True)
    shifted = (-normalized - entropy).abs()
    sorted_shifted, order = shifted.sort(dim=-1)
    cumulative = scores.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1, keepdim=True).clamp_(max=scores.shape[-1] - 1)
    drop = sorted_shifted > sorted_shifted.gather(1, last)
    drop[:, 0].fill_(False)
    drop &= mass < 1.0
    return scores.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Inverse-CDF draw: one uniform per row from that row's own generator, so batching never changes it.
    The uniforms stay on the device: no host round trip per row."""
    uniforms = torch.cat([torch.rand(1, generator=g, device=g.device if g is not None else probs.device)
                          for g in generators]).to(probs.device)
    # 1 - U[0,1) lies in (0, 1], so the chosen id always has nonzero probability (exact in float32)
    cdf = probs.cumsum(dim=-1)
    target = (1.0 - uniforms)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target).squeeze(1)
    return ids.clamp_(max=probs.shape[-1] - 1)
