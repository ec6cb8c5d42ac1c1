"""A step as rank 0 broadcasts it: a header and one flat list of ints (ModelRunner._unpack reads it back).

    payload: [input_ids T | positions T | sample rows S | decode context lens B | prefill begins P |
              prefill ends P | decode block tables B*max_blocks | each prefill's blocks | prompt rows R |
              prompt token ids R]
"""

from __future__ import annotations

from genserve.server.prompt_scores import PromptTarget, prompt_target
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput

# step header: [is_step, num_tokens, num_decodes, max_blocks, num_prefills, num_samples, max_len, payload_len,
#               num_prompt_logprob_rows]
HEADER_SIZE = 9


def pack_step(out: SchedulerOutput, bs: int) -> tuple[list[int], list[int], list[ScheduledRequest],
                                                      list[PromptTarget]]:
    """The step as a header and one flat list of ints (the payload `_unpack` reads), plus the sampling
    order and prompt targets that stay on rank 0."""
    # decodes (one new token, or one plus drafts) first: they share one batched attention call
    decodes = [s for s in out.scheduled if s.num_new_tokens == 1 or s.draft_token_ids]
    prefills = [s for s in out.scheduled if s.num_new_tokens > 1 and not s.draft_token_ids]
    input_ids: list[int] = []
    positions: list[int] = []
    sample_rows: list[int] = []
    sampling_order: list[ScheduledRequest] = []
    context_lens: list[int] = []
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
            positions.append(pos + i)
            context_lens.append(pos + i + 1)
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
        positions.extend(range(begin, end))
        begins.append(begin)
        ends.append(end)
        tables += req.block_ids[:-(-end // bs)]
        if s.is_sampling:
            sample_rows.append(len(input_ids) - 1)
            sampling_order.append(s)
    scored_ids = [t for _, _, ids, _ in prompt_targets for t in ids]
    values = (input_ids + positions + sample_rows + context_lens + begins + ends + tables + prompt_rows
              + scored_ids)
    header = [1, len(input_ids), len(context_lens), max_blocks, len(prefills), len(sample_rows), max_len,
              len(values), len(prompt_rows)]
    return header, values, sampling_order, prompt_targets
