"""N-gram (prompt-lookup) speculative decoding: draft tokens from the request's own history.

Drafting looks for the latest earlier occurrence of the sequence's last n tokens (longest n first)
and proposes the tokens that followed it. The runner scores the last token and the drafts in one
forward, each as a decode row of its own context length (so the paged decode kernel verifies them
in the same batched call as plain decodes); a draft is kept while it equals what the model itself
picks at that position, so greedy output is exactly what decoding one token at a time gives.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class NgramProposer:
    num_speculative_tokens: int
    max_ngram: int = 3
    min_ngram: int = 1
    # how far back the lookup goes: a match further away rarely predicts, and the scan is Python
    max_lookback: int = 1024

    def propose(self, token_ids: list[int]) -> list[int]:
        """Up to `num_speculative_tokens` tokens that followed the latest earlier match of the suffix."""
        k = self.num_speculative_tokens
        n_tokens = len(token_ids)
        if k <= 0 or n_tokens < self.min_ngram + 1:
            return []
        lo = max(0, n_tokens - self.max_lookback)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            suffix = token_ids[n_tokens - n:]
            last = suffix[-1]
            # candidate match ends at position end (inclusive), strictly before the suffix itself
            for end in range(n_tokens - 2, lo + n - 2, -1):
                if token_ids[end] == last and token_ids[end - n + 1:end + 1] == suffix:
                    return token_ids[end + 1:end + 1 + k]
        return []


def num_accepted(draft_token_ids: list[int], sampled_token_ids: list[int]) -> int:
    """Drafts kept: the leading ones equal to the token sampled at the position before them."""
    n = 0
    for draft, sampled in zip(draft_token_ids, sampled_token_ids, strict=False):
        if draft != sampled:
            break
        n += 1
    return n
