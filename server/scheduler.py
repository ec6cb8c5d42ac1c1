"""Continuous batching: which requests run this step, and how many tokens each computes.

One rule covers prefill and decode (vLLM v1): a request has `num_tokens` known and
`num_computed_tokens` in the KV cache, and each step closes part of that gap. A long prompt is
cut into chunks by the per-step token budget, so it never stalls the decodes running beside it.

Order of work in a step:
1. running requests, oldest first; when the pool is full the newest running request is preempted
   (its blocks freed, recomputed later) until the older one fits; with LongRoPE (Phi-3) a request that
   outgrows the original length is recomputed the same way, with the long factors (layers/rotary.py);
2. waiting requests, FIFO, while the token budget, batch size and free blocks allow, gated by TGI's
   `waiting_served_ratio` / `max_waiting_tokens` so small arrivals don't interrupt a big batch.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from genserve.server.kv_cache import KVCacheManager
from genserve.server.request import Request, RequestStatus
from genserve.server.speculation import num_accepted
from genserve.server.stopping import token_stop


@dataclass(slots=True)
class SchedulerConfig:
    max_batch_prefill_tokens: int
    max_batch_size: int
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    policy: str = "fcfs"  # "priority": waiting by (priority, arrival); preempt the lowest priority first
    max_loras: int = 0  # LoRA adapters a step may hold (--max-loras); 0: no limit
    # LongRoPE's original length: a request longer than it is rotated with the long factors at every position
    long_rope_from: int | None = None


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # drafts included
    draft_token_ids: list[int] = field(default_factory=list)  # after the last known token
    num_steps: int = 1  # decode steps run back to back (--num-scheduler-steps): one token sampled per step

    @property
    def num_samples(self) -> int:
        """Tokens the step samples for this request: after the last known token and each draft, or one per step."""
        return len(self.draft_token_ids) + self.num_steps

    @property
    def is_sampling(self) -> bool:
        """The chunk reaches the last known token, so its logits give the next one."""
        num_known = self.num_new_tokens - len(self.draft_token_ids)
        return self.request.num_computed_tokens + num_known == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.steps_since_admission = 0
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if self.config.policy == "priority":
            # behind every waiting request of the same or a more urgent priority (lower value first)
            ahead = sum(1 for r in self.waiting if r.sampling_params.priority <= request.sampling_params.priority)
            self.waiting.insert(ahead, request)
        else:
            self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work. Mutates block tables, never `num_computed_tokens`."""
        out = SchedulerOutput()
        budget = self.config.max_batch_prefill_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self._outgrows_short_rope(request):
                # as transformers, its whole sequence is computed again, with the long factors
                self.running.pop(index)
                self._preempt(request, count=False)
                out.preempted.append(request)
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            drafts = request.spec_token_ids[:min(budget - 1, self._short_rope_room(request))] if num_new == 1 else []
            request.spec_token_ids = []
            # drafts are optional: a pool too full for them runs the plain decode instead of preempting
            if drafts and self.kv_cache.allocate_slots(request, 1 + len(drafts)) is not None:
                out.scheduled.append(ScheduledRequest(request, 1 + len(drafts), drafts))
                budget -= 1 + len(drafts)
                index += 1
                continue
            while self.kv_cache.allocate_slots(request, num_new) is None:
                victim = self._pick_victim(index)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                index += 1
        if not out.preempted and self._may_admit():
            budget = self._admit_waiting(out, budget)
        self.steps_since_admission += 1
        return out

    def run_ahead(self, out: SchedulerOutput, steps: int) -> int:
        """Let a step of decodes only (one new token each, no drafts) run up to `steps` decode steps back to back,
        each feeding its greedy picks to the next (vLLM's multi-step scheduling): the blocks for the extra tokens
        are allocated here. Fewer steps where a request has fewer tokens left; one where the pool cannot hold them
        (the blocks already given stay with their requests: the next steps fill them). Returns the steps."""
        steps = min([steps] + [s.request.max_new_tokens - s.request.num_output_tokens for s in out.scheduled])
        if steps <= 1 or any(self.kv_cache.allocate_slots(s.request, steps) is None for s in out.scheduled):
            return 1
        for s in out.scheduled:
            s.num_steps = steps
        return steps

    def _pick_victim(self, first: int) -> Request:
        """The request to preempt among those not scheduled yet this step: the newest (fcfs), or the
        least urgent, newest first (priority)."""
        if self.config.policy != "priority":
            return self.running.pop()
        victim = max(self.running[first:], key=lambda r: (r.sampling_params.priority, r.arrival_time))
        self.running.remove(victim)
        return victim

    def _may_admit(self) -> bool:
        if not self.waiting:
            return False
        if not self.running or self.steps_since_admission >= self.config.max_waiting_tokens:
            return True
        num_admissible = min(len(self.waiting), self.config.max_batch_size - len(self.running))
        return num_admissible >= math.ceil(self.config.waiting_served_ratio * len(self.running))

    def _adapter_fits(self, request: Request) -> bool:
        """A request for an adapter the batch does not hold waits while `max_loras` others are running."""
        if not request.adapter_index or not self.config.max_loras:
            return True
        adapters = {r.adapter_index for r in self.running if r.adapter_index}
        return request.adapter_index in adapters or len(adapters) < self.config.max_loras

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        admitted = False
        held_back: list[Request] = []  # waiting on a LoRA slot: the requests behind them may go first
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            request = self.waiting[0]
            if not self._adapter_fits(request):
                held_back.append(self.waiting.popleft())
                continue
            long_rope = self.config.long_rope_from is not None and request.num_tokens > self.config.long_rope_from
            if long_rope != request.long_rope:
                self.kv_cache.forget(request)  # its hash chain is seeded by the factor set
                request.long_rope = long_rope
            computed_blocks, num_hit = self.kv_cache.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            if self.kv_cache.allocate_slots(request, num_new, computed_blocks) is None:
                break
            self.waiting.popleft()
            self.kv_cache.record_prefix_lookup(request.num_tokens, num_hit)
            request.num_computed_tokens = num_hit
            if request.status is RequestStatus.WAITING:
                request.num_cached_prompt_tokens = num_hit
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            admitted = True
        self.waiting.extendleft(reversed(held_back))
        if admitted:
            self.steps_since_admission = 0
        return budget

    def _preempt(self, request: Request, count: bool = True) -> None:
        self.kv_cache.free(request)
        request.spec_token_ids = []
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        if count:
            request.num_preemptions += 1
            self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _outgrows_short_rope(self, request: Request) -> bool:
        """Its KV was rotated with LongRoPE's short factors and it just grew past the original length."""
        limit = self.config.long_rope_from
        return limit is not None and not request.long_rope and request.num_tokens > limit

    def _short_rope_room(self, request: Request) -> int:
        """Drafts a request may verify before outgrowing LongRoPE's short factors (a draft at position q is
        computed as part of a sequence of q + 1 tokens)."""
        limit = self.config.long_rope_from
        if limit is None or request.long_rope:
            return len(request.spec_token_ids)
        return max(limit - request.num_tokens, 0)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance each scheduled request; append its sampled tokens (one, the drafts kept and the token after
        them, or one per step run back to back); finish on EOS, a stop token or length, dropping what follows."""
        finished = []
        for item in out.scheduled:
            request = item.request
            token_ids = sampled.get(request.request_id)
            drafts = item.draft_token_ids
            num_kept = 0
            if drafts:
                num_kept = num_accepted(drafts, token_ids)
                token_ids = token_ids[:num_kept + 1]
                request.num_draft_tokens += len(drafts)
                request.num_accepted_tokens += num_kept
            # the KV of rejected drafts stays in the tail blocks, overwritten by the next step; steps run back to
            # back computed the KV of every token they fed on
            request.num_computed_tokens += item.num_new_tokens - len(drafts) + num_kept + item.num_steps - 1
            stop = None
            for token_id in token_ids or ():
                request.append_output_token(token_id)
                if request.first_token_time is None:
                    request.first_token_time = time.monotonic()
                if (stop := token_stop(request, token_id)) is not None:
                    break
            # stopped on a kept draft: its KV is computed, the drafts after it are dropped
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens)
            self.kv_cache.cache_full_blocks(request)
            if stop is not None:
                self.finish_request(request, *stop)
                finished.append(request)
        return finished

    def finish_request(self, request: Request, status: RequestStatus, reason: str) -> None:
        """Finish or abort: blocks go back to the pool at once."""
        if request.is_finished:
            return
        request.status = status
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        self.kv_cache.forget(request)
        self.requests.pop(request.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish_request(request, RequestStatus.FINISHED_ABORTED, "aborted")
        return request
