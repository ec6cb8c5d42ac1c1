"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, reference counts and a prefix cache.

No tensors here: the runner owns the memory, this module only decides which block ids a request
uses. A full block is identified by a hash chained over every token before it, so two requests
sharing a prompt prefix map to the same blocks:

    block 0: h0 = hash((None, tokens[0:16]))
    block 1: h1 = hash((h0,   tokens[16:32]))   ...

A request with a LoRA adapter starts its chain at ("lora", adapter index) instead of None; one rotated with
LongRoPE's long factors (Request.long_rope) at ("long rope", that seed).

Freed blocks keep their hash and sit in an LRU queue; they are reused on a hit and evicted
(oldest first) only when a fresh block is needed.

With a sliding window of w tokens in every layer, no future query reads a key more than w - 1
positions before the next token, so a request's blocks wholly before that go back to the pool as it
runs. Its block list keeps its positions; a freed block's entry becomes `null_block` (the runner's
scratch block, one past the pool, never handed out), which the window keeps attention from reading:

    block_ids: [null, null, 7, 3, 12]   tokens 0..31 behind the window, 32..79 still in reach

A freed block was full and published already, so it stays in the prefix cache like any other.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from genserve.server.request import Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class _HashState:
    num_hashed_blocks: int = 0
    last_hash: int | None = None
    hashes: list[int] = field(default_factory=list)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        """sliding_window: the window of every layer (the widest), or None where any layer attends fully."""
        assert num_blocks > 0 and block_size > 0 and (sliding_window is None or sliding_window > 0)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.null_block = num_blocks  # stands in for blocks freed behind the window
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # unreferenced blocks, least recently freed first; cached ones are evicted from here
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.hash_states: dict[str, _HashState] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached full blocks matching the request's tokens, and how many tokens they hold.

        The last token is never taken from the cache: its logits must be computed to sample. With a sliding
        window only the blocks the first new token can see must be cached; the ones before are `null_block`.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs:
            return [], 0
        state = self._hash_state(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, state, max_blocks)
        found: list[int | None] = []
        for i in range(max_blocks):
            block_id = self.cached.get(state.hashes[i])
            if block_id is not None and self.blocks[block_id].token_ids != self._block_tokens(request, i):
                block_id = None
            if block_id is None and self.sliding_window is None:
                break
            found.append(block_id)
        num_hit_blocks, run = 0, 0  # run: cached blocks in a row ending at block i
        for i, block_id in enumerate(found):
            run = run + 1 if block_id is not None else 0
            if run and run >= (i + 1) - self._first_needed_block((i + 1) * self.block_size):
                num_hit_blocks = i + 1
        first = self._first_needed_block(num_hit_blocks * self.block_size)
        hits = [self.null_block] * first + found[first:num_hit_blocks]
        return hits, num_hit_blocks * self.block_size

    def _first_needed_block(self, position: int) -> int:
        """The first block a query at `position` (and every later one) reads."""
        if self.sliding_window is None:
            return 0
        return max(position - self.sliding_window + 1, 0) // self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Count a lookup once, when its request is admitted (a blocked request looks up every step)."""
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> list[int] | None:
        """Give the request enough blocks for `num_new_tokens` more tokens.

        `computed_blocks` are prefix-cache hits to adopt first (waiting requests only). Returns the
        newly allocated block ids, or None (and changes nothing) when the pool is too small: the
        scheduler then preempts or waits.
        """
        computed_blocks = computed_blocks or []
        if self.sliding_window is not None and not computed_blocks:
            self._free_behind_window(request)
        num_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_needed = -(-num_tokens // self.block_size) - len(request.block_ids) - len(computed_blocks)
        held = [b for b in computed_blocks if b != self.null_block]
        num_hits_in_free_queue = sum(1 for b in held if self.blocks[b].ref_count == 0)
        if num_needed > self.num_free_blocks - num_hits_in_free_queue:
            return None
        for block_id in held:
            self._touch(block_id)
        request.block_ids.extend(computed_blocks)
        new_blocks = [self._pop_free_block() for _ in range(max(num_needed, 0))]
        request.block_ids.extend(new_blocks)
        return new_blocks

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's newly completed blocks (all tokens computed) to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        state = self._hash_state(request)
        num_full = request.num_computed_tokens // self.block_size
        self._extend_hashes(request, state, num_full)
        for i in range(state.num_hashed_blocks, num_full):
            if request.block_ids[i] == self.null_block:  # freed behind the window (published before that)
                continue
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and state.hashes[i] not in self.cached:
                block.block_hash = state.hashes[i]
                block.token_ids = self._block_tokens(request, i)
                self.cached[block.block_hash] = block.block_id
        state.num_hashed_blocks = max(state.num_hashed_blocks, num_full)

    def free(self, request: Request) -> None:
        """Drop the request's references; tail blocks go first so they are evicted before shared heads."""
        for block_id in reversed(request.block_ids):
            if block_id == self.null_block:
                continue
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        request.block_ids.clear()
        state = self.hash_states.get(request.request_id)
        if state is not None:
            state.num_hashed_blocks = 0

    def _free_behind_window(self, request: Request) -> None:
        """Release the blocks no future query can see: the next token (at num_computed_tokens) and every one
        after it read keys from num_computed_tokens - w + 1 on; freed blocks form a prefix of the list."""
        for i in reversed(range(min(self._first_needed_block(request.num_computed_tokens), len(request.block_ids)))):
            block_id = request.block_ids[i]
            if block_id == self.null_block:
                break
            request.block_ids[i] = self.null_block
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def forget(self, request: Request) -> None:
        """The request is gone for good: drop its hash bookkeeping too."""
        self.hash_states.pop(request.request_id, None)

    def _hash_state(self, request: Request) -> _HashState:
        state = self.hash_states.get(request.request_id)
        if state is None:
            state = self.hash_states[request.request_id] = _HashState()
        return state

    def _block_tokens(self, request: Request, index: int) -> tuple[int, ...]:
        start = index * self.block_size
        return tuple(request.token_ids[start:start + self.block_size])

    def _extend_hashes(self, request: Request, state: _HashState, num_blocks: int) -> None:
        while len(state.hashes) < num_blocks:
            # the adapter seeds the chain: two adapters never share KV for the same tokens
            # ... and so do LongRoPE's two factor sets
            parent = state.hashes[-1] if state.hashes else _chain_seed(request)
            state.hashes.append(hash((parent, self._block_tokens(request, len(state.hashes)))))

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id


def _chain_seed(request: Request) -> object:
    seed = ("lora", request.adapter_index) if request.adapter_index else None
    return ("long rope", seed) if request.long_rope else seed
