"""Ranks > 0 of a tensor-parallel engine: load this rank's shard, then run every step rank 0 broadcasts."""

from __future__ import annotations

import logging
import os
import sys

import torch

from genserve.server import distributed
from genserve.server.config import EngineConfig

logger = logging.getLogger(__name__)


def start_tensor_parallel(config: EngineConfig, hf_config, model_dir, device: torch.device,
                          dtype: torch.dtype) -> torch.device:
    """Bring up config.num_shard ranks; returns rank 0's device.

    Self-launched (no RANK in the environment): spawns ranks 1..N-1. Under an external launcher,
    a rank > 0 runs the worker loop here and exits the process with SystemExit when rank 0 stops.
    """
    distributed.check_shardable(hf_config, config.num_shard)
    launch = distributed.resolve_launch(config.num_shard)
    threads = config.num_threads
    if device.type == "cpu" and not threads:
        # N ranks share the host's cores
        threads = max(1, (os.cpu_count() or 1) // launch.world_size)
        torch.set_num_threads(threads)
    if launch.rank > 0:
        raise SystemExit(run_worker(launch, config, hf_config, model_dir, device, dtype, threads))
    if not launch.is_external:
        distributed.spawn_workers(launch, worker_main,
                                  (launch, config, hf_config, str(model_dir), str(device), dtype, threads))
    device = distributed.rank_device(device, launch.local_rank)
    distributed.init_process_group(launch, device)
    return device


def worker_main(rank: int, launch: distributed.Launch, config: EngineConfig, hf_config, model_dir: str,
                device: str, dtype: torch.dtype, threads: int | None) -> None:
    """Entry point of a spawned rank (a fresh interpreter)."""
    from genserve.server.logging_setup import JSON_OUTPUT_ENV, configure_logging

    distributed.exit_with_parent()
    configure_logging(os.environ.get(JSON_OUTPUT_ENV) == "1", rank=rank)  # the server's format
    launch = distributed.Launch(rank, launch.world_size, rank, launch.master_addr, launch.master_port, False)
    sys.exit(run_worker(launch, config, hf_config, model_dir, torch.device(device), dtype, threads))


def run_worker(launch: distributed.Launch, config: EngineConfig, hf_config, model_dir, device: torch.device,
               dtype: torch.dtype, threads: int | None) -> int:
    from genserve.server.model_runner import ModelRunner

    if threads:
        torch.set_num_threads(threads)
    device = distributed.rank_device(device, launch.local_rank)
    distributed.init_process_group(launch, device)
    runner = ModelRunner(config, hf_config, model_dir, device, dtype)
    logger.info("rank %d ready", launch.rank)
    with torch.inference_mode():
        while (inputs := runner.receive()) is not None:
            runner.forward(inputs)  # rank 0 samples; here only the collectives matter
    distributed.shutdown()
    logger.info("rank %d stopped", launch.rank)
    return 0
