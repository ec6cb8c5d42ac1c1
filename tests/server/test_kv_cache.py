from genserve.server.kv_cache import KVCacheManager
from genserve.server.request import Request
from genserve.server.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(), max_new_tokens=8)


def compute(kv: KVCacheManager, req: Request, num_tokens: int) -> None:
    assert kv.allocate_slots(req, num_tokens) is not None
    req.num_computed_tokens += num_tokens
    kv.cache_full_blocks(req)


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    req = make_request("a", range(9))
    new = kv.allocate_slots(req, 9)
    assert new == req.block_ids and len(new) == 3
    assert kv.num_free_blocks == 7
    assert kv.allocate_slots(req, 0) == []
    req.num_computed_tokens = 9
    assert len(kv.allocate_slots(req, 3)) == 0  # 12 tokens still fit in 3 blocks
    assert len(kv.allocate_slots(req, 4)) == 1
    kv.free(req)
    assert kv.num_free_blocks == 10 and req.block_ids == []


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    req = make_request("a", range(12))
    assert kv.allocate_slots(req, 12) is None
    assert kv.num_free_blocks == 2 and req.block_ids == []


def test_prefix_hit_shares_blocks_and_counts_references():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    first = make_request("a", range(10))
    compute(kv, first, 10)
    second = make_request("b", list(range(8)) + [99, 98, 97])
    hits, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 8 and hits == first.block_ids[:2]
    assert kv.allocate_slots(second, second.num_tokens - num_hit, hits) is not None
    assert kv.blocks[hits[0]].ref_count == 2
    kv.free(first)
    assert kv.blocks[hits[0]].ref_count == 1
    assert kv.num_free_blocks == 10 - 3  # second: 2 shared + 1 new; first's tail block is free
    assert kv.prefix_cache_hits == 0  # counted by the scheduler on admission, not per lookup


def test_last_token_is_never_a_cache_hit():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    first = make_request("a", range(8))
    compute(kv, first, 8)
    same = make_request("b", range(8))
    _, num_hit = kv.get_computed_blocks(same)
    assert num_hit == 4  # block 2 would hold the last token, whose logits must be computed


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    old = make_request("old", [1, 2, 3, 4, 5])
    compute(kv, old, 5)
    kv.free(old)
    kv.forget(old)
    assert kv.num_free_blocks == 4 and len(kv.cached) == 2
    again = make_request("again", [1, 2, 3, 4, 6])
    hits, num_hit = kv.get_computed_blocks(again)
    assert num_hit == 4
    kv.allocate_slots(again, 1, hits)
    kv.free(again)
    kv.forget(again)
    # fill the whole pool with unrelated tokens: every cached block must be evicted, oldest first
    other = make_request("other", [7] * 8)
    assert kv.allocate_slots(other, 8) is not None
    assert kv.cached == {}
    hits, num_hit = kv.get_computed_blocks(make_request("x", [1, 2, 3, 4, 5]))
    assert num_hit == 0


def test_hash_collision_is_checked_against_tokens():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    first = make_request("a", [1, 2, 3])
    compute(kv, first, 3)
    # forge a collision: map the other prompt's first hash to the first request's block
    other = make_request("b", [5, 6, 7])
    state_hash = hash((None, (5, 6)))
    kv.cached[state_hash] = first.block_ids[0]
    _, num_hit = kv.get_computed_blocks(other)
    assert num_hit == 0


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    first = make_request("a", range(10))
    compute(kv, first, 10)
    assert kv.get_computed_blocks(make_request("b", range(10))) == ([], 0)


def test_blocks_behind_a_sliding_window_go_back_to_the_pool():
    kv = KVCacheManager(num_blocks=20, block_size=4, sliding_window=6)
    req = make_request("a", range(10))
    compute(kv, req, 10)  # blocks for tokens 0..11
    first_ids = list(req.block_ids)
    held = []
    for token in range(10, 40):
        req.token_ids.append(100 + token)
        # this step's query (at num_computed_tokens) and every later one read from num_computed_tokens - 5
        # on: allocating its slot drops every block before that one, and keeps every block from it on
        first_needed = req.num_computed_tokens - 5
        compute(kv, req, 1)
        held.append(kv.num_used_blocks)
        assert all(b == kv.null_block for b in req.block_ids[:first_needed // 4])
        assert kv.null_block not in req.block_ids[first_needed // 4:]
    assert max(held) <= 3 and len(req.block_ids) == 10  # 6 + 1 tokens span at most 3 blocks
    # the freed blocks were full and published: they stay in the prefix cache until evicted
    again = make_request("b", list(range(10)) + [7])
    hits, num_hit = kv.get_computed_blocks(again)
    assert hits == first_ids[:2] and num_hit == 8
    kv.free(req)
    assert kv.num_free_blocks == 20 and req.block_ids == []


def test_windowed_requests_sharing_blocks_free_only_their_own_references():
    kv = KVCacheManager(num_blocks=20, block_size=4, sliding_window=4)
    first = make_request("a", range(17))
    compute(kv, first, 17)
    second = make_request("b", list(range(16)) + [50, 51])
    hits, num_hit = kv.get_computed_blocks(second)
    shared = first.block_ids[3]  # the only block position 16's window (13..16) needs
    assert num_hit == 16 and hits == [kv.null_block] * 3 + [shared]
    assert kv.allocate_slots(second, 2, hits) is not None
    second.num_computed_tokens = 18
    kv.cache_full_blocks(second)
    assert kv.blocks[shared].ref_count == 2
    for token in (17, 18):  # first reads from token 16 on after two more tokens: block 3 is behind it
        first.token_ids.append(token)
        compute(kv, first, 1)
    assert kv.allocate_slots(first, 1) is not None
    assert first.block_ids[:4] == [kv.null_block] * 4 and kv.blocks[shared].ref_count == 1
    second.token_ids.append(52)
    compute(kv, second, 1)
    assert kv.allocate_slots(second, 1) is not None
    assert kv.blocks[shared].ref_count == 0 and shared in kv.free_queue
    # an evicted block leaves the cache: a later lookup stops before it instead of reading another request's KV
    big = make_request("c", range(100, 100 + 4 * kv.num_free_blocks))
    assert kv.allocate_slots(big, big.num_tokens) is not None
    hits, _ = kv.get_computed_blocks(make_request("d", list(range(16)) + [1]))
    assert hits == []
    for request in (first, second, big):
        kv.free(request)
    assert kv.num_free_blocks == 20


def test_no_window_or_a_full_layer_keeps_every_block():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    req = make_request("a", range(30))
    compute(kv, req, 30)
    assert kv.allocate_slots(req, 1) is not None and kv.null_block not in req.block_ids


def test_a_windowed_prefix_hit_needs_only_the_blocks_its_window_reads():
    kv = KVCacheManager(num_blocks=20, block_size=4, sliding_window=4)
    first = make_request("a", range(30))
    compute(kv, first, 30)
    first.token_ids.append(99)
    compute(kv, first, 1)  # blocks 0..5 are behind the window now, back in the free queue (still cached)
    assert first.block_ids[:6] == [kv.null_block] * 6
    head, kept = kv.blocks[0].block_id, first.block_ids[6]
    other = make_request("c", range(1000, 1068))
    assert kv.allocate_slots(other, 68) is not None  # evicts 12 unused blocks and 5 of the freed ones
    assert [kv.cached.get(h) is not None for h in kv.hash_states["a"].hashes[:7]] == [True] + [False] * 5 + [True]
    # a request with the same 30 tokens: its first new token (position 28) reads tokens 25..28, so block 6 is
    # all it needs; the chain's evicted blocks become null_block entries, never read
    second = make_request("b", list(range(30)) + [7])
    hits, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 28 and hits == [kv.null_block] * 6 + [kept] and head == 0
    assert kv.allocate_slots(second, second.num_tokens - num_hit, hits) is not None
    assert kv.blocks[kept].ref_count == 2 and second.block_ids[:7] == hits
    for request in (first, second, other):
        kv.free(request)
    assert kv.num_free_blocks == 20
    # without a window the chain stops at the first evicted block
    plain = KVCacheManager(num_blocks=20, block_size=4)
    compute(plain, make_request("a", range(30)), 30)
    hits, num_hit = plain.get_computed_blocks(make_request("b", list(range(30)) + [7]))
    assert num_hit == 28 and len(hits) == 7 and plain.null_block not in hits
