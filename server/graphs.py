"""Decode-only steps on static buffers, padded up to batch-size buckets: CUDA graphs on CUDA.

A decode-only step of n rows runs as the smallest bucket b >= n (TGI's --cuda-graphs sizes). Rows
n..b-1 are padding: token 0 at position 0 with a context of one token in the scratch block, a KV
block the cache manager never hands out, so padding writes and reads only that block and never
touches a request's KV. The step's inputs are copied into buffers that every bucket shares (rows
[:b]), and the attention metadata is built from those buffers inside the captured region:

    input_ids [B]   positions [B]   block tables [B, max_blocks]   context lens [B]
      real rows | pad: 0              real rows | pad: scratch       real rows | pad: 1

On CUDA each bucket is captured once at start-up (torch.cuda.CUDAGraph, largest first, one memory
pool) and a step replays it; elsewhere the same buffers, padding and metadata run eagerly, which is
how the CPU tests prove the logic a capture would record. Steps with prefill chunks, or more rows
than the largest bucket, run eagerly as before.
"""

from __future__ import annotations

import logging
import os

import torch

from genserve.server.config import parse_batch_sizes
from genserve.server.layers.attention import AttentionMetadata, forward_context, set_decode_metadata

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def graph_batch_sizes(spec: str | None, device: torch.device, max_batch_size: int) -> list[int]:
    """The buckets `--cuda-graphs` asks for on this device: TGI's default on CUDA, none elsewhere.

    GENSERVE_EAGER_GRAPHS=1 keeps an explicit list without CUDA, run eagerly: how the tests drive the
    padded path through every rank of a tensor-parallel engine on CPU."""
    sizes = list(DEFAULT_BATCH_SIZES) if spec is None else parse_batch_sizes(spec)
    if device.type != "cuda" and not (spec is not None and os.environ.get("GENSERVE_EAGER_GRAPHS") == "1"):
        if spec is not None and sizes:
            logger.info("--cuda-graphs %s ignored: no CUDA device", spec)
        return []
    return [size for size in sizes if size <= max_batch_size]


class DecodeGraphs:
    def __init__(self, model, buckets: list[int], max_blocks: int, block_size: int, scratch_block: int,
                 backend: str, flash: bool, device: torch.device, capture: bool) -> None:
        self.model = model
        self.buckets = sorted(buckets)
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.backend = backend
        self.flash = flash
        rows = self.buckets[-1]
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.block_tables = torch.full((rows, max_blocks), scratch_block, dtype=torch.long, device=device)
        self.context_lens = torch.ones(rows, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # each graph's static output
        if capture:
            self._capture()

    def bucket_for(self, num_rows: int, num_blocks: int) -> int | None:
        """The bucket a decode-only step of `num_rows` rows, `num_blocks` blocks wide, runs in; None: eager."""
        if num_blocks > self.max_blocks:
            return None
        return next((b for b in self.buckets if b >= num_rows), None)

    def run(self, bucket: int, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] of a decode-only step of n rows, run padded to `bucket` rows."""
        n, width = block_tables.shape
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:bucket].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:bucket].zero_()
        self.block_tables[:bucket].fill_(self.scratch_block)
        self.block_tables[:n, :width].copy_(block_tables)
        self.context_lens[:n].copy_(context_lens)
        self.context_lens[n:bucket].fill_(1)
        graph = self.graphs.get(bucket)
        if graph is None:
            return self._forward(bucket)[:n]
        graph.replay()
        return self.hidden[bucket][:n]

    def _forward(self, bucket: int) -> torch.Tensor:
        """The step over the buffers' first `bucket` rows: what a capture records."""
        bs = self.block_size
        tables, lens = self.block_tables[:bucket], self.context_lens[:bucket]
        last = lens - 1
        slots = tables.gather(1, (last // bs)[:, None]).squeeze(1) * bs + last % bs
        meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=bucket)
        set_decode_metadata(meta, self.backend, tables, lens, bs, self.max_blocks * bs, flash=self.flash)
        with forward_context(meta):
            return self.model(self.input_ids[:bucket], self.positions[:bucket])

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for bucket in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
                for _ in range(2):  # lazy initialisation (cuBLAS handles, allocator) stays out of the graph
                    self._forward(bucket)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.hidden[bucket] = self._forward(bucket)
                self.graphs[bucket] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", ",".join(map(str, self.buckets)))
