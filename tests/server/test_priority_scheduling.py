"""--scheduling-policy priority (vLLM): waiting requests by priority (lower first, FIFO within one);
under memory pressure the least urgent running request is preempted. Fake runner, real bookkeeping."""

import pytest

from genserve.server.config import EngineConfig
from genserve.server.kv_cache import KVCacheManager
from genserve.server.request import Request
from genserve.server.sampling_params import SamplingParams
from genserve.server.scheduler import Scheduler, SchedulerConfig


def make(policy: str, num_blocks=64, batch_size=1) -> Scheduler:
    return Scheduler(SchedulerConfig(64, batch_size, waiting_served_ratio=0.0, policy=policy),
                     KVCacheManager(num_blocks, 4))


def req(rid: str, priority: int, prompt_len=4, max_new=2) -> Request:
    return Request(rid, list(range(100, 100 + prompt_len)), SamplingParams(priority=priority), max_new_tokens=max_new)


def admission_order(s: Scheduler) -> list[str]:
    order = []
    while s.has_unfinished:
        out = s.schedule()
        for item in out.scheduled:
            if item.request.request_id not in order:
                order.append(item.request.request_id)
        s.update_from_output(out, {i.request.request_id: [7] for i in out.scheduled if i.is_sampling})
    return order


@pytest.mark.parametrize("policy, expected", [("fcfs", ["a", "b", "c", "d", "e"]),
                                              ("priority", ["c", "e", "a", "d", "b"])])
def test_waiting_order(policy, expected):
    s = make(policy)
    for rid, priority in [("a", 0), ("b", 5), ("c", -3), ("d", 0), ("e", -3)]:
        s.add_request(req(rid, priority))
    assert admission_order(s) == expected


@pytest.mark.parametrize("policy, victim", [("fcfs", "urgent"), ("priority", "lazy")])
def test_preemption_victim(policy, victim):
    """`lazy` runs first; `urgent` joins; the pool runs dry: fcfs preempts the newest, priority the least urgent."""
    s = make(policy, num_blocks=4, batch_size=4)
    s.add_request(req("lazy", 9, prompt_len=4, max_new=12))
    out = s.schedule()
    s.update_from_output(out, {i.request.request_id: [7] for i in out.scheduled if i.is_sampling})
    s.add_request(req("urgent", 0, prompt_len=4, max_new=12))
    preempted = []
    while s.has_unfinished and not preempted:
        out = s.schedule()
        preempted = [r.request_id for r in out.preempted]
        s.update_from_output(out, {i.request.request_id: [7] for i in out.scheduled if i.is_sampling})
    assert preempted == [victim]


def test_policy_flag_is_checked():
    assert EngineConfig(scheduling_policy="priority").scheduling_policy == "priority"
    with pytest.raises(ValueError, match="`--scheduling-policy` must be one of fcfs, priority"):
        EngineConfig(scheduling_policy="lifo")
