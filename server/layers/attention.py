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

Per layer, optionally (transformers' semantics):

    sliding_window w   a query at position p sees the keys at positions (p - w, p]
    logit_softcap c    scores = c * tanh(scores / c), before any mask (Gemma 2)
    alibi_slopes m     scores[h] += m[h] * (key position - query position) (BLOOM)

FlashAttention applies a window itself (window_size=(w - 1, 0)) but cannot change the scores, so
layers with soft-capping or ALiBi run SDPA / the scores path and the native kernel, never it.
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
from genserve.server.layers import kv_storage

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
    # gather: [B, L] key position - query position, and each window's [B, 1, 1, L] mask; built once per step
    decode_relative_pos: torch.Tensor | None = None
    decode_window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def head_major_rows(self, num_kv_heads: int) -> torch.Tensor:
        if self.decode_head_rows is None:
            heads = torch.arange(num_kv_heads, device=self.decode_gather_index.device)
            rows = self.decode_gather_index[:, None, :] * num_kv_heads + heads[None, :, None]
            self.decode_head_rows = rows.reshape(-1)
        return self.decode_head_rows

    def relative_positions(self) -> torch.Tensor:
        if self.decode_relative_pos is None:
            width = self.decode_gather_index.shape[1]
            positions = torch.arange(width, device=self.decode_gather_index.device)
            lens = self.decode_context_lens
            if lens is None:  # metadata built by hand with a mask only
                lens = self.decode_mask.view(self.decode_mask.shape[0], -1).sum(-1)
            self.decode_relative_pos = positions[None, :] - (lens[:, None] - 1)
        return self.decode_relative_pos

    def gather_mask(self, window: int | None) -> torch.Tensor:
        """The gather backend's mask [B, 1, 1, L]: the real context, cut to the last `window` keys."""
        if window is None:
            return self.decode_mask
        mask = self.decode_window_masks.get(window)
        if mask is None:
            mask = self.decode_mask & (self.relative_positions() > -window).view(self.decode_mask.shape)
            self.decode_window_masks[window] = mask
        return mask


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
        meta.decode_context_lens = lens
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


def choose_decode_backend(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int,
                          score_mods: bool = False, kv_float8: bool = False) -> tuple[str, bool]:
    """(decode backend, whether it runs through FlashAttention); GENSERVE_DECODE_ATTENTION overrides.

    CPU: the native kernel when it builds, else gather (varlen's per-row SDPA is about as fast on CPU).
    CUDA: FlashAttention in place when the block size allows, else over packed contexts; gather
    without FlashAttention (float32, older GPUs). `score_mods`: some layer soft-caps its scores or adds
    ALiBi, which FlashAttention cannot do, so it is never chosen. `kv_float8`: the pool holds float8, which
    only the paths that copy it out (gather, varlen) can widen."""
    flash = flash_attention_usable(device, dtype, head_dim) and not score_mods
    in_place = flash and block_size % FLASH_PAGE_MULTIPLE == 0 and not kv_float8
    kernel = device.type == "cpu" and head_dim in kernels.SUPPORTED_HEAD_DIMS and not kv_float8
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
                         f"{SUPPORTED_HEAD_DIMS_TEXT}, a C++ compiler to build the kernel and a KV cache in the "
                         "model dtype (not --kv-cache-dtype fp8)")
    if wanted == "flash_paged" and score_mods:
        raise ValueError("GENSERVE_DECODE_ATTENTION=flash_paged cannot serve this model: FlashAttention has no "
                         "attention logit soft-capping or ALiBi; use kernel (CPU), gather or varlen")
    if wanted == "flash_paged" and not in_place:
        raise ValueError("GENSERVE_DECODE_ATTENTION=flash_paged needs FlashAttention (CUDA sm80+, fp16/bf16), "
                         f"a --block-size that is a multiple of {FLASH_PAGE_MULTIPLE} and a KV cache in the model dtype")
    return wanted, flash and wanted in ("varlen", "flash_paged")


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, visible: torch.Tensor | None,
           bias: torch.Tensor | None = None, softcap: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """SDPA over 4-D [N, heads, len, D] inputs (keys may have fewer heads: grouped query attention).

    visible: bool, True where a key counts; bias: added to the scores (ALiBi); softcap: c * tanh(s / c)
    on the scores before either, which SDPA cannot do, so that case runs matmul + softmax."""
    group = q.shape[1] // keys.shape[1]
    if softcap is None:
        mask = visible
        if bias is not None:
            mask = bias.to(q.dtype) if visible is None else bias.to(q.dtype).masked_fill(~visible, float("-inf"))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=group > 1)
    if group > 1:
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if is_causal:
        visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), values)


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
    """Attention over this rank's heads; the runner attaches `k_cache`/`v_cache` [slots, kv_heads, head_dim].

    sliding_window: keys at positions (p - w, p] for a query at p (None: every earlier key);
    logit_softcap: scores = c * tanh(scores / c); alibi_slopes: [num_heads] slopes of this rank's heads."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logit_softcap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens, got {sliding_window}")
        if logit_softcap is not None and logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive, got {logit_softcap}")
        if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
            raise ValueError(f"alibi_slopes must hold one slope per head ({num_heads}), got {tuple(alibi_slopes.shape)}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        # not a parameter: computed from the config, never in a checkpoint
        self.register_buffer("alibi_slopes", None if alibi_slopes is None else alibi_slopes.float(), persistent=False)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    @property
    def has_score_mods(self) -> bool:
        """Soft-capping or ALiBi: changes to the scores FlashAttention cannot make."""
        return self.logit_softcap is not None or self.alibi_slopes is not None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H*D]; k, v: [T, KVH*D] -> [T, H*D]
        meta = get_forward_context()
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        kv_storage.store(self.k_cache, meta.slot_mapping, k)
        kv_storage.store(self.v_cache, meta.slot_mapping, v)
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

    def _flash_window(self, causal: bool) -> tuple[int, int]:
        # FlashAttention's (left, right) reach; decode rows are one query each, which sees every key unwindowed
        return ((-1, 0) if causal else (-1, -1)) if self.sliding_window is None else (self.sliding_window - 1, 0)

    def _refuse_flash(self, what: str) -> None:
        if self.has_score_mods:
            raise RuntimeError(f"{what} through FlashAttention cannot apply logit soft-capping or ALiBi; "
                               "the runner must pick another attention path for this model")

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        backend = meta.decode_backend or ("kernel" if meta.decode_block_tables is not None else "gather")
        if backend == "kernel":
            return kernels.paged_decode_attention(q.contiguous(), self.k_cache, self.v_cache,
                                                  meta.decode_block_tables, meta.decode_context_lens,
                                                  meta.block_size, self.scale, self.sliding_window,
                                                  self.logit_softcap, self.alibi_slopes)
        if backend == "flash_paged":
            self._refuse_flash("decode")
            pages = self.k_cache.shape[0] // meta.block_size
            shape = (pages, meta.block_size, self.num_kv_heads, self.head_dim)
            return varlen_attn(q, self.k_cache.view(shape), self.v_cache.view(shape), meta.decode_cu_queries,
                               meta.decode_cu_lens, 1, meta.decode_max_len, scale=self.scale, enable_gqa=True,
                               window_size=self._flash_window(causal=False), seqused_k=meta.decode_context_lens,
                               block_table=meta.decode_block_tables)
        if backend == "varlen":
            keys = kv_storage.load(self.k_cache, meta.decode_slots, q.dtype)  # [S, KVH, D], no padding
            values = kv_storage.load(self.v_cache, meta.decode_slots, q.dtype)
            if meta.decode_flash:
                self._refuse_flash("decode")
                return varlen_attn(q, keys, values, meta.decode_cu_queries, meta.decode_cu_lens, 1,
                                   meta.decode_max_len, scale=self.scale, enable_gqa=True,
                                   window_size=self._flash_window(causal=False))
            return self._packed_decode(q, keys, values, meta.decode_host_cu_lens)
        return self._gather_decode(q, meta)

    def _packed_decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       cu_lens: list[int]) -> torch.Tensor:
        """What FlashAttention's varlen kernel computes, one SDPA call per row over its slice of the packed
        contexts: q [B, H, D]; keys, values [S, KVH, D] -> [B, H, D]."""
        group = self.num_heads // self.num_kv_heads
        shape = (1, self.num_kv_heads, group, self.head_dim)  # a KV group's heads as the query length
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            start, end = cu_lens[b], cu_lens[b + 1]
            if self.sliding_window is not None:
                start = max(start, end - self.sliding_window)
            bias = None
            if self.alibi_slopes is not None:
                relative = torch.arange(start - end + 1, 1, device=q.device)
                bias = (self.alibi_slopes[:, None] * relative[None, :]).view(1, self.num_kv_heads, group, -1)
            out[b] = attend(q[b].view(shape), keys[start:end].transpose(0, 1)[None],
                            values[start:end].transpose(0, 1)[None], self.scale, None, bias,
                            self.logit_softcap).view(self.num_heads, self.head_dim)
        return out

    def _gather_decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        batch = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        context_len = meta.decode_gather_index.shape[1]
        # one index_select straight into head-major [B, KVH, L, D], ready for attention without a copy
        rows = meta.head_major_rows(self.num_kv_heads)
        shape = (batch, self.num_kv_heads, context_len, self.head_dim)
        keys = kv_storage.load(self.k_cache.view(-1, self.head_dim), rows, q.dtype).view(shape)
        values = kv_storage.load(self.v_cache.view(-1, self.head_dim), rows, q.dtype).view(shape)
        # a KV group's query heads act as SDPA's query length: one fused kernel, no KV-head expansion
        # (27% faster on CPU than matmul + softmax + matmul, which beat SDPA with enable_gqa)
        qg = q.view(batch, self.num_kv_heads, group, self.head_dim)
        mask = meta.gather_mask(self.sliding_window)
        bias = None
        if self.alibi_slopes is not None:  # [B, KVH, G, L]: query head kvh * G + g
            slopes = self.alibi_slopes.view(1, self.num_kv_heads, group, 1)
            bias = slopes * meta.relative_positions()[:, None, None, :]
        out = attend(qg, keys, values, self.scale, mask, bias, self.logit_softcap)
        return out.reshape(batch, self.num_heads, self.head_dim)

    def _flash_prefill(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Every prefill chunk in one FlashAttention call over the chunks' whole contexts, packed (the new
        tokens' K/V are in the cache already); causal aligns each chunk's queries to the end of its context."""
        self._refuse_flash("prefill")
        keys = kv_storage.load(self.k_cache, meta.prefill_slots, q.dtype)
        values = kv_storage.load(self.v_cache, meta.prefill_slots, q.dtype)
        starts = meta.prefill_starts
        max_query = max(starts[i + 1] - starts[i] for i in range(len(starts) - 1))
        return varlen_attn(q, keys, values, meta.prefill_cu_queries, meta.prefill_cu_lens, max_query,
                           max(meta.prefill_context_lens), scale=self.scale, window_size=self._flash_window(causal=True),
                           enable_gqa=True)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_len: int,
                 gather_index: torch.Tensor | None) -> torch.Tensor:
        num_new = q.shape[0]
        # a window as long as the context cuts nothing: keep SDPA's causal fast path
        window = self.sliding_window if self.sliding_window is not None and ctx_len > self.sliding_window else None
        first_key = 0 if window is None else max(0, ctx_len - num_new - window + 1)  # older keys are out of reach
        if gather_index is None:
            keys, values = k, v
        else:
            gather_index = gather_index[first_key:]
            keys, values = (kv_storage.load(self.k_cache, gather_index, q.dtype),
                            kv_storage.load(self.v_cache, gather_index, q.dtype))
        mask, bias, causal = None, None, False
        if gather_index is None and window is None and not self.has_score_mods:
            causal = True
        else:
            # query j sits at position ctx_len - num_new + j and sees keys up to there (and within the window)
            query_pos = torch.arange(ctx_len - num_new, ctx_len, device=q.device)
            key_pos = torch.arange(ctx_len - keys.shape[0], ctx_len, device=q.device)
            relative = key_pos[None, :] - query_pos[:, None]  # [Q, L]
            mask = relative <= 0
            if window is not None:
                mask &= relative > -window
            if self.alibi_slopes is not None:
                bias = self.alibi_slopes[None, :, None, None] * relative
        # 4-D inputs: with 3-D ones CPU SDPA falls back to the math kernel (S x S scores, 3-4x slower)
        out = attend(q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                     self.scale, mask, bias, self.logit_softcap, is_causal=causal)
        return out[0].transpose(0, 1)
