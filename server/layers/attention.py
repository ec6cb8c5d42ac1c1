"""Paged attention: new K/V go into a block pool, queries read K/V back through block tables.

Token layout of one step (the runner orders it so):

    [ decode tokens: one per sequence | prefill chunks: ragged, one run per sequence ]

Decode reads every sequence's context with one of four backends (AttentionMetadata.decode_backend):

    kernel       the native CPU kernel reads the pool in place through the block tables
    gather       every context is copied, padded to the longest, and SDPA runs with a mask
    varlen       every context is copied packed, without padding: FlashAttention's varlen kernel
                 on CUDA, SDPA per sequence over the same packed copy elsewhere
    flash_paged  FlashAttention reads the pool in place through the block tables (CUDA; its
                 bundled FlashAttention 2 needs a block size that is a multiple of 256)

Prefill runs SDPA per sequence; with FlashAttention (CUDA), one varlen call covers every chunk of
the step, cached prefixes included (causal, aligned to the end of each context).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.varlen import varlen_attn

from genserve.server import kernels

DECODE_BACKENDS = ("kernel", "gather", "varlen", "flash_paged")
# decode backends whose inputs have static shapes for a given batch (graph capture needs them)
STATIC_DECODE_BACKENDS = ("kernel", "gather", "flash_paged")
FLASH_PAGE_MULTIPLE = 256
SUPPORTED_HEAD_DIMS_TEXT = ", ".join(map(str, kernels.SUPPORTED_HEAD_DIMS))


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat slot index of each new token in the pool
    num_decode_tokens: int = 0
    decode_backend: str | None = None  # None: kernel when block tables are set, else gather
    decode_gather_index: torch.Tensor | None = None  # [B, L] flat slots of each decode context
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] bool: True where the context is real
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] (kernel, flash_paged)
    decode_context_lens: torch.Tensor | None = None  # [B]
    block_size: int = 0
    # varlen / flash_paged: contexts one after another, no padding
    decode_slots: torch.Tensor | None = None  # [S] flat slot of every context token (varlen)
    decode_cu_lens: torch.Tensor | None = None  # [B + 1] int32 cumulative context lengths
    decode_host_cu_lens: list[int] | None = None  # the same on the host (varlen without FlashAttention)
    decode_cu_queries: torch.Tensor | None = None  # [B + 1] int32 0, 1, ..., B (one query per row)
    decode_max_len: int = 0
    decode_flash: bool = False  # varlen / flash_paged through FlashAttention (CUDA)
    # prefill chunk i covers tokens prefill_starts[i]:prefill_starts[i+1] after the decodes
    prefill_starts: list[int] = field(default_factory=list)
    prefill_context_lens: list[int] = field(default_factory=list)
    prefill_gather_index: list[torch.Tensor | None] = field(default_factory=list)  # None: no cached prefix
    # FlashAttention prefill: every chunk's whole context, packed, and the cumulative lengths [P + 1] (int32)
    prefill_flash: bool = False
    prefill_slots: torch.Tensor | None = None
    prefill_cu_queries: torch.Tensor | None = None
    prefill_cu_lens: torch.Tensor | None = None
    # [B * KVH * L] rows of the cache viewed as [slots * KVH, D], head-major; built once per step
    decode_head_rows: torch.Tensor | None = None

    def head_major_rows(self, num_kv_heads: int) -> torch.Tensor:
        if self.decode_head_rows is None:
            heads = torch.arange(num_kv_heads, device=self.decode_gather_index.device)
            rows = self.decode_gather_index[:, None, :] * num_kv_heads + heads[None, :, None]
            self.decode_head_rows = rows.reshape(-1)
        return self.decode_head_rows


def set_decode_metadata(meta: AttentionMetadata, backend: str, tables: torch.Tensor, lens: torch.Tensor,
                        block_size: int, max_len: int, host_lens: list[int] | None = None,
                        flash: bool = False) -> None:
    """Fill `meta`'s decode fields from block tables [B, W] and context lengths [B] (device tensors).

    max_len: at least the longest context (the padded width of `gather`); host_lens: the lengths on
    the host, needed by `varlen` (so building its packed index never reads the device).
    """
    assert backend in DECODE_BACKENDS, backend
    meta.decode_backend = backend
    num_rows, device = lens.shape[0], lens.device
    if backend == "kernel":
        meta.decode_block_tables, meta.decode_context_lens, meta.block_size = tables, lens, block_size
        return
    if backend == "gather":
        offsets = torch.arange(block_size, device=device)
        meta.decode_gather_index = (tables[:, :, None] * block_size + offsets).view(num_rows, -1)[:, :max_len]
        meta.decode_mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None]).view(num_rows, 1, 1, max_len)
        return
    cu_lens = torch.zeros(num_rows + 1, dtype=torch.int32, device=device)
    cu_lens[1:] = lens.cumsum(0)
    meta.decode_cu_lens, meta.decode_max_len, meta.decode_flash = cu_lens, max_len, flash
    meta.decode_cu_queries = torch.arange(num_rows + 1, dtype=torch.int32, device=device)
    if backend == "flash_paged":
        meta.decode_block_tables, meta.decode_context_lens = tables.to(torch.int32), lens.to(torch.int32)
        meta.block_size = block_size
        return
    assert host_lens is not None, "varlen needs the context lengths on the host"
    host_cu = [0]
    for n in host_lens:
        host_cu.append(host_cu[-1] + n)
    seq_ids = torch.repeat_interleave(torch.arange(num_rows, device=device), lens, output_size=host_cu[-1])
    pos = torch.arange(host_cu[-1], device=device) - cu_lens.long()[seq_ids]
    meta.decode_slots = tables[seq_ids, pos // block_size] * block_size + pos % block_size
    meta.decode_host_cu_lens = host_cu


def flash_attention_usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether torch's FlashAttention 2 (varlen_attn) runs here: CUDA sm80+, fp16/bf16, head_dim % 8 == 0, <= 256."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 256:
        return False
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device)[0] >= 8


def choose_decode_backend(device: torch.device, dtype: torch.dtype, head_dim: int,
                          block_size: int) -> tuple[str, bool]:
    """(decode backend, whether it runs through FlashAttention); GENSERVE_DECODE_ATTENTION overrides.

    CPU: the native kernel when it builds, else gather (varlen's per-row SDPA is about as fast on CPU).
    CUDA: FlashAttention in place when the block size allows, else over packed contexts; gather
    without FlashAttention (float32, older GPUs)."""
    flash = flash_attention_usable(device, dtype, head_dim)
    in_place = flash and block_size % FLASH_PAGE_MULTIPLE == 0
    kernel = device.type == "cpu" and head_dim in kernels.SUPPORTED_HEAD_DIMS
    wanted = os.environ.get("GENSERVE_DECODE_ATTENTION", "auto")
    if wanted == "auto":
        if device.type == "cpu":
            return ("kernel" if kernel and kernels.load_cpu_kernels() else "gather"), False
        return ("flash_paged" if in_place else "varlen" if flash else "gather"), flash
    if wanted not in DECODE_BACKENDS:
        raise ValueError(f"GENSERVE_DECODE_ATTENTION must be auto or one of {', '.join(DECODE_BACKENDS)}; "
                         f"got {wanted!r}")
    if wanted == "kernel" and not (kernel and kernels.load_cpu_kernels()):
        raise ValueError("GENSERVE_DECODE_ATTENTION=kernel needs a CPU device, a head_dim of "
                         f"{SUPPORTED_HEAD_DIMS_TEXT} and a C++ compiler to build the kernel")
    if wanted == "flash_paged" and not in_place:
        raise ValueError("GENSERVE_DECODE_ATTENTION=flash_paged needs FlashAttention (CUDA sm80+, fp16/bf16) and "
                         f"a --block-size that is a multiple of {FLASH_PAGE_MULTIPLE}")
    return wanted, flash and wanted in ("varlen", "flash_paged")


_context: AttentionMetadata | None = None


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    global _context
    _context = meta
    try:
        yield
    finally:
        _context = None


def get_forward_context() -> AttentionMetadata:
    assert _context is not None, "attention called outside forward_context()"
    return _context


class Attention(nn.Module):
    """Attention over this rank's heads; the runner attaches `k_cache`/`v_cache` [slots, kv_heads, head_dim]."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H*D]; k, v: [T, KVH*D] -> [T, H*D]
        meta = get_forward_context()
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        self.k_cache.index_copy_(0, meta.slot_mapping, k)
        self.v_cache.index_copy_(0, meta.slot_mapping, v)
        nd = meta.num_decode_tokens
        if nd == num_tokens:  # decode-only step: no scatter into a shared output
            return self._decode(q, meta).view(num_tokens, self.num_heads * self.head_dim)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], meta)
        if meta.prefill_flash:
            out[nd:] = self._flash_prefill(q[nd:], meta)
            return out.view(num_tokens, self.num_heads * self.head_dim)
        for i, ctx_len in enumerate(meta.prefill_context_lens):
            start, end = nd + meta.prefill_starts[i], nd + meta.prefill_starts[i + 1]
            out[start:end] = self._prefill(q[start:end], k[start:end], v[start:end], ctx_len,
                                           meta.prefill_gather_index[i])
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        backend = meta.decode_backend or ("kernel" if meta.decode_block_tables is not None else "gather")
        if backend == "kernel":
            return kernels.paged_decode_attention(q.contiguous(), self.k_cache, self.v_cache,
                                                  meta.decode_block_tables, meta.decode_context_lens,
                                                  meta.block_size, self.scale)
        if backend == "flash_paged":
            pages = self.k_cache.shape[0] // meta.block_size
            shape = (pages, meta.block_size, self.num_kv_heads, self.head_dim)
            return varlen_attn(q, self.k_cache.view(shape), self.v_cache.view(shape), meta.decode_cu_queries,
                               meta.decode_cu_lens, 1, meta.decode_max_len, scale=self.scale, enable_gqa=True,
                               seqused_k=meta.decode_context_lens, block_table=meta.decode_block_tables)
        if backend == "varlen":
            keys = self.k_cache.index_select(0, meta.decode_slots)  # [S, KVH, D], no padding
            values = self.v_cache.index_select(0, meta.decode_slots)
            if meta.decode_flash:
                return varlen_attn(q, keys, values, meta.decode_cu_queries, meta.decode_cu_lens, 1,
                                   meta.decode_max_len, scale=self.scale, enable_gqa=True)
            return self._packed_decode(q, keys, values, meta.decode_host_cu_lens)
        return self._gather_decode(q, meta)

    def _packed_decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       cu_lens: list[int]) -> torch.Tensor:
        """What FlashAttention's varlen kernel computes, one SDPA call per row over its slice of the packed
        contexts: q [B, H, D]; keys, values [S, KVH, D] -> [B, H, D]."""
        shape = (1, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            start, end = cu_lens[b], cu_lens[b + 1]
            out[b] = F.scaled_dot_product_attention(q[b].view(shape), keys[start:end].transpose(0, 1)[None],
                                                    values[start:end].transpose(0, 1)[None],
                                                    scale=self.scale).view(self.num_heads, self.head_dim)
        return out

    def _gather_decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        batch = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        context_len = meta.decode_gather_index.shape[1]
        # one index_select straight into head-major [B, KVH, L, D], ready for attention without a copy
        rows = meta.head_major_rows(self.num_kv_heads)
        shape = (batch, self.num_kv_heads, context_len, self.head_dim)
        keys = self.k_cache.view(-1, self.head_dim).index_select(0, rows).view(shape)
        values = self.v_cache.view(-1, self.head_dim).index_select(0, rows).view(shape)
        # a KV group's query heads act as SDPA's query length: one fused kernel, no KV-head expansion
        # (27% faster on CPU than matmul + softmax + matmul, which beat SDPA with enable_gqa)
        qg = q.view(batch, self.num_kv_heads, group, self.head_dim)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=meta.decode_mask, scale=self.scale)
        return out.reshape(batch, self.num_heads, self.head_dim)

    def _flash_prefill(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Every prefill chunk in one FlashAttention call over the chunks' whole contexts, packed (the new
        tokens' K/V are in the cache already); causal aligns each chunk's queries to the end of its context."""
        keys = self.k_cache.index_select(0, meta.prefill_slots)
        values = self.v_cache.index_select(0, meta.prefill_slots)
        starts = meta.prefill_starts
        max_query = max(starts[i + 1] - starts[i] for i in range(len(starts) - 1))
        return varlen_attn(q, keys, values, meta.prefill_cu_queries, meta.prefill_cu_lens, max_query,
                           max(meta.prefill_context_lens), scale=self.scale, window_size=(-1, 0), enable_gqa=True)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_len: int,
                 gather_index: torch.Tensor | None) -> torch.Tensor:
        num_new = q.shape[0]
        if gather_index is None:
            keys, values, mask, causal = k, v, None, True
        else:
            keys, values = self.k_cache.index_select(0, gather_index), self.v_cache.index_select(0, gather_index)
            # query j sits at position ctx_len - num_new + j and sees keys up to there
            query_pos = torch.arange(ctx_len - num_new, ctx_len, device=q.device)
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= query_pos[:, None]
            causal = False
        # 4-D inputs: with 3-D ones CPU SDPA falls back to the math kernel (S x S scores, 3-4x slower)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out[0].transpose(0, 1)
