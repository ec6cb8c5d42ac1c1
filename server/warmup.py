"""The largest steps the scheduler can send, run once before the KV pool is sized (TGI's warm-up).

One prefill of `max_batch_prefill_tokens` tokens (split into sequences of at most
`max_total_tokens`), then the largest decode batch through a sampler with every warper on, over a
temporary one-block cache. Their peak memory beyond the weights is what the pool must leave free:
`torch.cuda.max_memory_allocated` on CUDA; on CPU, which keeps no allocator statistics, the peak
bytes of the tensors the steps create, counted op by op, from steps scaled down (see
profile_max_step).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from genserve.server.request import Request
from genserve.server.sampler import SamplingRow, make_generator
from genserve.server.sampling_params import SamplingParams
from genserve.server.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)

# CPU: the size the warm-up steps actually run at (None: the full size, as on CUDA)
CPU_PROFILE_TOKENS: int | None = 256
CPU_PROFILE_ROWS = 32


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create while active, each counted until its last tensor is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_of(t)[0] for t in tree_flatten((args, kwargs))[0]}
        for t in tree_flatten(out)[0]:
            key, nbytes = _storage_of(t)
            if key is None:
                continue
            if key in self.refs:  # a view of (or in place on) a storage counted already
                self.refs[key] += 1
            elif key in inputs or nbytes == 0:  # a view of a weight or of the cache
                continue
            else:
                self.refs[key], self.sizes[key] = 1, nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)


def _storage_of(t) -> tuple[int | None, int]:
    if not isinstance(t, torch.Tensor):
        return None, 0
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # opaque layouts (oneDNN-packed weights) have no storage
        return None, 0
    return storage.data_ptr(), storage.nbytes()


def measure_peak_bytes(run: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as tracker:
        run()
    return tracker.peak


def max_size_steps(config, device: torch.device, num_tokens: int, num_rows: int
                   ) -> list[tuple[SchedulerOutput, list[SamplingRow]]]:
    """A prefill of `num_tokens` tokens (sequences of at most max_total_tokens) and a decode step of
    `num_rows` rows with every warper on, as the scheduler would send them; every K/V goes to block 0."""
    longest, bs = config.max_total_tokens, config.block_size
    prefills, greedy = [], []
    while num_tokens > 0:
        n = min(num_tokens, longest)
        request = Request(f"warmup-prefill-{len(prefills)}", [0] * n, SamplingParams(), max_new_tokens=1)
        request.block_ids = [0] * -(-n // bs)
        prefills.append(ScheduledRequest(request, n))
        greedy.append(SamplingRow(SamplingParams(), None, request.token_ids, n))
        num_tokens -= n
    warped = SamplingParams(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, typical_p=0.9,
                            repetition_penalty=1.1, frequency_penalty=0.1, top_n_tokens=config.max_top_n_tokens)
    decodes, rows = [], []
    for i in range(num_rows):
        request = Request(f"warmup-decode-{i}", [0, 0], warped, max_new_tokens=1)
        request.num_computed_tokens, request.block_ids = 1, [0]
        decodes.append(ScheduledRequest(request, 1))
        rows.append(SamplingRow(warped, make_generator(i, device), request.token_ids, 1))
    return [(SchedulerOutput(prefills), greedy), (SchedulerOutput(decodes), rows)]


def profile_max_step(runner) -> int:
    """Peak bytes beyond the weights of the largest prefill and decode steps, run on every rank alike
    (their collectives pair up) over a temporary cache of one block; the runner's cache is left empty.

    On CPU the steps run at most CPU_PROFILE_TOKENS tokens / CPU_PROFILE_ROWS rows and each peak is
    scaled to the full size: activations grow linearly with both, and a full-size step of even a
    135M model takes most of a minute on two cores."""
    config, device, bs = runner.config, runner.device, runner.block_size
    num_tokens = config.max_batch_prefill_tokens
    num_rows = min(config.max_batch_size, config.max_batch_prefill_tokens)
    run_tokens, run_rows = num_tokens, num_rows
    if device.type != "cuda" and CPU_PROFILE_TOKENS:
        run_tokens, run_rows = min(num_tokens, CPU_PROFILE_TOKENS), min(num_rows, CPU_PROFILE_ROWS)
    for layer in runner.attention_layers:
        layer.k_cache = torch.zeros(bs, layer.num_kv_heads, layer.head_dim, dtype=runner.kv_dtype, device=device)
        layer.v_cache = torch.zeros_like(layer.k_cache)
    peaks = []
    for (out, rows), scale in zip(max_size_steps(config, device, run_tokens, run_rows),
                                  (num_tokens / run_tokens, num_rows / run_rows), strict=True):
        def run(out=out, rows=rows) -> None:
            with torch.inference_mode():
                logits, _ = runner.forward(runner.local_inputs(out))
                runner.sampler(logits.float(), rows)

        peaks.append(int(measure_peak_bytes(run, device) * scale))
    for layer in runner.attention_layers:
        layer.k_cache = layer.v_cache = torch.empty(0, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    logger.info("largest steps: %d prefill tokens need %.1f MiB, %d decode rows %.1f MiB beyond the weights%s",
                num_tokens, peaks[0] / 2**20, num_rows, peaks[1] / 2**20,
                f" (measured at {run_tokens} and {run_rows}, scaled)" if run_tokens < num_tokens else "")
    return max(peaks)
