"""Tensor parallelism: process-group set-up, worker supervision and the collectives the layers use.

tp=1 when torch.distributed is not initialized. With tp > 1, rank 0 is the engine process; ranks
1..N-1 are workers, either spawned here (one pod, one command) or started by a launcher such as
torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_INIT_TIMEOUT_S = 300.0
# workers wait for the next step on this group while the server idles: it must not time out
IDLE_TIMEOUT = timedelta(days=3650)

_step_group: dist.ProcessGroup | None = None
_workers: list[mp.process.BaseProcess] = []
_watchdog_stop = threading.Event()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_tp_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_tp_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` across ranks in place; a no-op at tp=1."""
    if get_tp_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    tp_size = get_tp_size()
    if tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def broadcast_cpu(x: torch.Tensor) -> torch.Tensor:
    """Broadcast a CPU tensor from rank 0 over the gloo step group (the step metadata, the KV-block count)."""
    dist.broadcast(x, src=0, group=_step_group)
    return x


def broadcast_ints(values: list[int]) -> list[int]:
    """Rank 0's values on every rank (the kernel choices timed at startup: all shards of a layer then run one kernel,
    where each rank timing its own could pick differently on a noisy machine); at tp=1 as they are."""
    if get_tp_size() == 1 or not values:
        return values
    return broadcast_cpu(torch.tensor(values, dtype=torch.long)).tolist()


def all_reduce_min_cpu(value: int) -> int:
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_step_group)
    return int(t.item())


def check_shardable(hf_config, num_shard: int) -> None:
    """Raise ValueError unless every sharded dimension of the model splits over `num_shard` ranks."""
    if num_shard < 1:
        raise ValueError(f"--num-shard must be >= 1, not {num_shard}")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % num_shard:
        valid = [n for n in range(1, heads + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]
        raise ValueError(f"--num-shard {num_shard} does not divide the model's {heads} attention heads "
                         f"(num_attention_heads % num_shard != 0); use one of {valid}")
    if kv_heads % num_shard and num_shard % kv_heads:
        raise ValueError(f"--num-shard {num_shard} and the model's {kv_heads} KV heads: one must divide the "
                         "other (KV heads are split, or replicated when there are fewer than shards)")
    # GPT-2 and BLOOM name no intermediate_size (4 x hidden unless n_inner says otherwise)
    for name in ("intermediate_size", "moe_intermediate_size"):  # each expert is sharded like a dense MLP
        if getattr(hf_config, name, None) and getattr(hf_config, name) % num_shard:
            raise ValueError(f"--num-shard {num_shard} does not divide {name} {getattr(hf_config, name)}")


@dataclass(frozen=True, slots=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    is_external: bool  # started by a launcher (torchrun, one container per rank): nothing to spawn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_launch(num_shard: int, env: dict | None = None) -> Launch:
    """RANK and WORLD_SIZE set: this process is one rank of an external launch. Otherwise this is rank 0
    and spawns the others, rendezvousing on MASTER_ADDR/MASTER_PORT when set, else a free local port."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = int(env["WORLD_SIZE"])
        if world_size != num_shard:
            raise ValueError(f"WORLD_SIZE={world_size} but --num-shard {num_shard}: they must agree")
        rank = int(env["RANK"])
        return Launch(rank, world_size, int(env.get("LOCAL_RANK", rank)), addr, int(env.get("MASTER_PORT", 29500)),
                      is_external=True)
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port()
    return Launch(0, num_shard, 0, addr, port, is_external=False)


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"rank with LOCAL_RANK={local_rank} needs cuda:{local_rank}, "
                           f"but only {torch.cuda.device_count()} GPUs are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_process_group(launch: Launch, device: torch.device, timeout_s: float | None = None) -> None:
    """Join the group (NCCL on CUDA, gloo on CPU) plus a gloo group for step broadcasts.

    Raises RuntimeError naming the rendezvous address when the ranks do not all arrive within timeout_s.
    """
    global _step_group
    timeout_s = timeout_s or float(os.environ.get("GENSERVE_TP_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S))
    backend = "nccl" if device.type == "cuda" else "gloo"
    url = f"tcp://{launch.master_addr}:{launch.master_port}"
    try:
        dist.init_process_group(backend, init_method=url, rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        _step_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)
        assert int(probe.item()) == launch.world_size
    except Exception as exc:
        if is_distributed():
            dist.destroy_process_group()
        _step_group = None
        raise RuntimeError(
            f"tensor-parallel set-up failed for rank {launch.rank} of {launch.world_size} ({backend} at {url}, "
            f"timeout {timeout_s:g} s; set GENSERVE_TP_INIT_TIMEOUT to change it): {exc}") from exc
    logger.info("rank %d/%d joined the %s group at %s", launch.rank, launch.world_size, backend, url)


def spawn_workers(launch: Launch, target, args: tuple) -> None:
    """Start ranks 1..world_size-1 as `target(rank, *args)` in spawned processes, and watch them."""
    ctx = mp.get_context("spawn")
    _watchdog_stop.clear()
    # at interpreter exit multiprocessing terminates daemon workers: that is no crash
    atexit.register(_watchdog_stop.set)
    for rank in range(1, launch.world_size):
        proc = ctx.Process(target=target, args=(rank, *args), name=f"genserve-tp-rank{rank}", daemon=True)
        proc.start()
        logger.info("started tensor-parallel worker rank %d (pid %d)", rank, proc.pid)
        _workers.append(proc)
    threading.Thread(target=_watch_workers, args=(list(_workers),), name="genserve-tp-watchdog", daemon=True).start()


def _watch_workers(procs: list) -> None:
    alive = {p.sentinel: p for p in procs}
    while alive:
        for sentinel in mp.connection.wait(list(alive)):
            proc = alive.pop(sentinel)
            proc.join()
            if _watchdog_stop.is_set():
                continue
            # the other ranks are stuck in (or will reach) a collective with it: there is no recovery
            logger.critical("tensor-parallel worker %s (pid %d) exited with code %s: exiting",
                            proc.name, proc.pid, proc.exitcode)
            os._exit(1)


def exit_with_parent() -> None:
    """In a spawned worker: exit as soon as the parent (rank 0) is gone, even mid-collective."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="genserve-parent-watch", daemon=True).start()


def shutdown(timeout_s: float = 10.0) -> None:
    """Join the spawned workers (after they got the stop message) and leave the process group."""
    global _step_group
    _watchdog_stop.set()
    for proc in _workers:
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
    _workers.clear()
    if is_distributed():
        dist.destroy_process_group()
    _step_group = None
