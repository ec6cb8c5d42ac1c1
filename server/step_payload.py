"""A step as rank 0 broadcasts it: a header of named counts and one flat list of ints.

`pack_step` writes the payload and `StepLayout` reads it back, side by side in this file, so the two
cannot drift apart:

    payload: [input_ids T | positions T | sample rows S | decode context lens B | decode slots B |
              prefill begins P | prefill ends P | decode block tables B*max_blocks | each prefill's blocks |
              prompt rows R | prompt token ids R | LoRA segments 3*L (start, end, adapter index)]

With LoRA adapters, the decodes and the prefills are each ordered by adapter, so the rows of one adapter
form few segments; base rows (adapter 0) are in none.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

from genserve.server.layers.rotary import LONG_ROPE_OFFSET
from genserve.server.prompt_scores import PromptTarget, prompt_target
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput


@dataclass(frozen=True, slots=True)
class StepHeader:
    """The counts a rank needs to cut the payload; broadcast first, as HEADER_SIZE ints (is_step first)."""

    num_tokens: int  # T: every new token of the step
    num_decodes: int  # B: decode rows (drafts included), first in the token order
    max_blocks: int  # columns of the decode block tables
    num_prefills: int  # P: prompt chunks after the decodes
    num_samples: int  # S: rows that sample a token
    max_len: int  # longest decode context
    payload_len: int
    num_prompt_rows: int  # R: rows whose logits score a prompt token
    num_lora_segments: int = 0  # L: runs of rows sharing a LoRA adapter

    def to_list(self) -> list[int]:
        return [1, *astuple(self)]

    @classmethod
    def from_list(cls, values: list[int]) -> StepHeader | None:
        """None for the shutdown header (is_step = 0)."""
        return cls(*values[1:]) if values[0] else None


HEADER_SIZE = 1 + len(fields(StepHeader))
SHUTDOWN_HEADER = [0] * HEADER_SIZE


@dataclass(frozen=True, slots=True)
class StepLayout:
    """Where each section of a payload lies (the reading side of `pack_step`)."""

    input_ids: slice
    positions: slice
    sample_rows: slice
    decode_lens: slice
    decode_slots: slice  # each decode row's new K/V slot: computed here, not by six tensor ops per step
    prefill_begins: slice
    prefill_ends: slice
    decode_tables: slice
    prefill_blocks: slice  # each prefill's blocks, one run after another
    prompt_rows: slice
    prompt_token_ids: slice
    lora_segments: slice

    @classmethod
    def of(cls, h: StepHeader) -> StepLayout:
        sizes = [h.num_tokens, h.num_tokens, h.num_samples, h.num_decodes, h.num_decodes, h.num_prefills,
                 h.num_prefills, h.num_decodes * h.max_blocks]
        cuts = [0]
        for size in sizes:
            cuts.append(cuts[-1] + size)
        lora_start = h.payload_len - 3 * h.num_lora_segments
        prompt_start = lora_start - 2 * h.num_prompt_rows
        spans = [slice(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
        return cls(*spans, prefill_blocks=slice(cuts[-1], prompt_start),
                   prompt_rows=slice(prompt_start, prompt_start + h.num_prompt_rows),
                   prompt_token_ids=slice(prompt_start + h.num_prompt_rows, lora_start),
                   lora_segments=slice(lora_start, h.payload_len))


def lora_segments(row_adapters: list[tuple[int, int]]) -> list[int]:
    """(adapter index, rows) per request in row order -> flat (start, end, index) runs, base rows left out."""
    out: list[int] = []
    row = 0
    for index, num_rows in row_adapters:
        if index and out and out[-2] == row and out[-1] == index:
            out[-2] = row + num_rows
        elif index:
            out += [row, row + num_rows, index]
        row += num_rows
    return out


def rope_offset(request) -> int:
    """Added to the positions of a request rotated with LongRoPE's long factors (layers/rotary.py)."""
    return LONG_ROPE_OFFSET if request.long_rope else 0


def pack_step(out: SchedulerOutput, bs: int) -> tuple[StepHeader, list[int], list[ScheduledRequest],
                                                      list[PromptTarget]]:
    """The step as a header and one flat list of ints (the payload `_unpack` reads), plus the sampling
    order and prompt targets that stay on rank 0."""
    # decodes (one new token, or one plus drafts) first: they share one batched attention call
    decodes = [s for s in out.scheduled if s.num_new_tokens == 1 or s.draft_token_ids]
    prefills = [s for s in out.scheduled if s.num_new_tokens > 1 and not s.draft_token_ids]
    if any(s.request.adapter_index for s in out.scheduled):  # stable: without adapters nothing moves
        decodes.sort(key=lambda s: s.request.adapter_index)
        prefills.sort(key=lambda s: s.request.adapter_index)
    row_adapters = [(s.request.adapter_index, s.num_new_tokens) for s in decodes + prefills]
    input_ids: list[int] = []
    positions: list[int] = []
    sample_rows: list[int] = []
    sampling_order: list[ScheduledRequest] = []
    context_lens: list[int] = []
    decode_slots: list[int] = []
    prompt_rows: list[int] = []
    prompt_targets: list[PromptTarget] = []
    decode_block_ids: list[list[int]] = []
    for s in decodes:
        req = s.request
        pos = req.num_computed_tokens
        # a one-token prompt chunk (the budget's last token) rides with the decodes
        if (target := prompt_target(req, pos, pos + 1)) is not None:
            prompt_rows.append(len(input_ids))
            prompt_targets.append(target)
        if s.is_sampling:
            sampling_order.append(s)
        # each draft is a decode row of its own, seeing the context up to itself
        for i, token_id in enumerate([req.token_ids[pos], *s.draft_token_ids]):
            if s.is_sampling:
                sample_rows.append(len(input_ids))
            input_ids.append(token_id)
            positions.append(pos + i + rope_offset(req))
            context_lens.append(pos + i + 1)
            decode_slots.append(req.block_ids[(pos + i) // bs] * bs + (pos + i) % bs)
            decode_block_ids.append(req.block_ids)
    max_len = max(context_lens, default=0)
    max_blocks = -(-max_len // bs)
    tables: list[int] = []
    for block_ids in decode_block_ids:
        blocks = block_ids[:max_blocks]
        tables += blocks
        tables += [0] * (max_blocks - len(blocks))
    begins: list[int] = []
    ends: list[int] = []
    for s in prefills:
        req = s.request
        begin, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
        if (target := prompt_target(req, begin, end)) is not None:
            prompt_rows.extend(range(len(input_ids), len(input_ids) + len(target[2])))
            prompt_targets.append(target)
        input_ids.extend(req.token_ids[begin:end])
        positions.extend(range(begin + rope_offset(req), end + rope_offset(req)))
        begins.append(begin)
        ends.append(end)
        tables += req.block_ids[:-(-end // bs)]
        if s.is_sampling:
            sample_rows.append(len(input_ids) - 1)
            sampling_order.append(s)
    scored_ids = [t for _, _, ids, _ in prompt_targets for t in ids]
    segments = lora_segments(row_adapters)
    values = (input_ids + positions + sample_rows + context_lens + decode_slots + begins + ends + tables
              + prompt_rows + scored_ids + segments)
    header = StepHeader(num_tokens=len(input_ids), num_decodes=len(context_lens), max_blocks=max_blocks,
                        num_prefills=len(prefills), num_samples=len(sample_rows), max_len=max_len,
                        payload_len=len(values), num_prompt_rows=len(prompt_rows),
                        num_lora_segments=len(segments) // 3)
    return header, values, sampling_order, prompt_targets
