"""Scheduler tests with a fake runner: tokens are made up, bookkeeping is real."""

from genserve.server.kv_cache import KVCacheManager
from genserve.server.request import Request, RequestStatus
from genserve.server.sampling_params import SamplingParams
from genserve.server.scheduler import Scheduler, SchedulerConfig


def make_scheduler(num_blocks=64, block_size=4, prefill_tokens=64, batch_size=16, ratio=0.0, max_waiting=20):
    kv = KVCacheManager(num_blocks, block_size)
    config = SchedulerConfig(prefill_tokens, batch_size, waiting_served_ratio=ratio, max_waiting_tokens=max_waiting)
    return Scheduler(config, kv)


def make_request(rid, prompt_len, max_new=4, eos=(), first_token=100):
    return Request(rid, list(range(first_token, first_token + prompt_len)), SamplingParams(),
                   max_new_tokens=max_new, eos_token_ids=frozenset(eos))


def fake_step(scheduler, token=7):
    out = scheduler.schedule()
    sampled = {s.request.request_id: [token] for s in out.scheduled if s.is_sampling}
    finished = scheduler.update_from_output(out, sampled)
    return out, finished, sampled


def run_to_completion(scheduler, max_steps=1000):
    finished = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished:
            return finished
        _, done, _ = fake_step(scheduler)
        finished += done
    raise AssertionError("did not finish")


def test_prefill_then_decode_one_token_per_step():
    s = make_scheduler()
    req = make_request("a", 10, max_new=3)
    s.add_request(req)
    out, _, _ = fake_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 10)]
    out, _, _ = fake_step(s)
    assert out.scheduled[0].num_new_tokens == 1
    _, finished, _ = fake_step(s)
    assert finished == [req] and req.finish_reason == "length" and req.num_output_tokens == 3
    assert s.kv_cache.num_free_blocks == s.kv_cache.num_blocks


def test_token_budget_chunks_long_prompt_while_decodes_continue():
    s = make_scheduler(prefill_tokens=8)
    short = make_request("short", 4, max_new=10)
    s.add_request(short)
    fake_step(s)
    long = make_request("long", 20, max_new=2, first_token=500)
    s.add_request(long)
    chunks = []
    for _ in range(3):
        out, _, sampled = fake_step(s)
        by_id = {x.request.request_id: x for x in out.scheduled}
        assert by_id["short"].num_new_tokens == 1  # the decode is never starved
        assert out.num_batched_tokens <= 8
        chunks.append(by_id["long"].num_new_tokens)
        assert ("long" in sampled) == (sum(chunks) == 20)
    assert chunks == [7, 7, 6]
    assert long.num_output_tokens == 1


def test_max_batch_size_limits_running():
    s = make_scheduler(batch_size=2)
    for i in range(3):
        s.add_request(make_request(f"r{i}", 4, max_new=5))
    out, _, _ = fake_step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 1


def test_kv_budget_limits_admission():
    s = make_scheduler(num_blocks=4, block_size=4)
    s.add_request(make_request("a", 12, max_new=2))
    s.add_request(make_request("b", 12, max_new=2))
    out, _, _ = fake_step(s)
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    finished = run_to_completion(s)
    assert {r.request_id for r in finished} == {"a", "b"}


def test_preemption_evicts_newest_and_recomputes_it():
    s = make_scheduler(num_blocks=6, block_size=4, prefill_tokens=64)
    a, b = make_request("a", 8, max_new=12), make_request("b", 8, max_new=12)
    s.add_request(a)
    s.add_request(b)
    preempted = []
    finished = []
    for _ in range(200):
        if not s.has_unfinished:
            break
        out, done, _ = fake_step(s)
        preempted += [r.request_id for r in out.preempted]
        finished += done
    assert preempted and preempted[0] == "b"  # newest goes first, the oldest keeps running
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert {r.request_id for r in finished} == {"a", "b"}
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert s.kv_cache.num_free_blocks == 6


def test_fifo_fairness_and_waiting_served_ratio():
    s = make_scheduler(ratio=0.5, max_waiting=3)
    for i in range(4):
        s.add_request(make_request(f"r{i}", 4, max_new=50))
    fake_step(s)
    assert len(s.running) == 4
    s.add_request(make_request("late", 4, max_new=2))
    # 1 waiting < 0.5 * 4 running: held back until max_waiting_tokens steps have passed
    admitted_at = None
    for step in range(1, 6):
        out, _, _ = fake_step(s)
        if any(x.request.request_id == "late" for x in out.scheduled):
            admitted_at = step
            break
    assert admitted_at == 3


def test_abort_frees_blocks_at_once():
    s = make_scheduler()
    req = make_request("a", 10, max_new=50)
    s.add_request(req)
    fake_step(s)
    assert s.kv_cache.num_used_blocks > 0
    s.abort("a")
    assert req.status is RequestStatus.FINISHED_ABORTED
    assert s.kv_cache.num_used_blocks == 0 and not s.has_unfinished
    waiting = make_request("w", 4)
    s.add_request(waiting)
    s.abort("w")
    assert not s.waiting


def test_eos_finishes_and_prefix_cache_skips_shared_prompt():
    s = make_scheduler(block_size=4)
    first = make_request("a", 12, max_new=5, eos={7})
    s.add_request(first)
    run_to_completion(s)
    assert first.finish_reason == "eos_token" and first.num_output_tokens == 1
    second = make_request("b", 12, max_new=1)
    s.add_request(second)
    out, _, _ = fake_step(s)
    assert second.num_cached_prompt_tokens == 8
    assert out.scheduled[0].num_new_tokens == 4
    assert (s.kv_cache.prefix_cache_queries, s.kv_cache.prefix_cache_hits) == (12 + 12, 8)


def test_prefix_lookups_of_a_blocked_request_are_counted_once():
    s = make_scheduler(num_blocks=4, block_size=4)
    s.add_request(make_request("big", 12, max_new=2))
    s.add_request(make_request("blocked", 12, max_new=2, first_token=300))
    fake_step(s)
    fake_step(s)  # "blocked" looks the cache up again each step while it waits for blocks
    assert s.kv_cache.prefix_cache_queries == 12
    run_to_completion(s)
    assert s.kv_cache.prefix_cache_queries == 24


def test_run_ahead_allocates_the_steps_blocks_and_counts_every_token_fed():
    s = make_scheduler(num_blocks=8, block_size=4)
    req = make_request("a", 6, max_new=10, eos=(9,))
    s.add_request(req)
    fake_step(s)  # prefill: 6 tokens computed, one sampled
    out = s.schedule()
    assert s.run_ahead(out, 4) == 4 and out.scheduled[0].num_steps == 4 and out.scheduled[0].num_samples == 4
    # 6 computed + 4 fed (the last known token and three picks) = 10 tokens: three blocks of 4
    assert len(req.block_ids) == 3
    s.update_from_output(out, {"a": [7, 7, 7, 7]})
    assert req.num_output_tokens == 5 and req.num_computed_tokens == 10 and req.num_tokens == 11
    # a burst that meets EOS: the picks after it are dropped and the request finishes
    out = s.schedule()
    assert s.run_ahead(out, 4) == 4
    finished = s.update_from_output(out, {"a": [7, 9, 7, 7]})
    assert finished == [req] and req.finish_reason == "eos_token" and req.token_ids[-2:] == [7, 9]
    assert s.kv_cache.num_free_blocks == s.kv_cache.num_blocks


def test_run_ahead_stops_at_the_length_limit_and_falls_back_when_the_pool_is_full():
    s = make_scheduler(num_blocks=3, block_size=4)
    req = make_request("a", 7, max_new=3)
    s.add_request(req)
    fake_step(s)
    out = s.schedule()
    assert s.run_ahead(out, 8) == 2  # two tokens left to the limit
    s.update_from_output(out, {"a": [7, 7]})
    assert req.is_finished and req.num_output_tokens == 3
    # 11 computed tokens hold all three blocks: one more token fits, four do not
    full = make_request("b", 11, max_new=10)
    s.add_request(full)
    fake_step(s)
    out = s.schedule()
    assert s.run_ahead(out, 4) == 1 and out.scheduled[0].num_steps == 1
    assert s.kv_cache.num_free_blocks == 0
