"""TGI launcher flags that are neither an engine setting nor an HTTP setting: each is honoured here,
or refused at startup with one line saying why, so a TGI command line never loses a flag silently."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import platform
import socket
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

USAGE_STATS = ("on", "off", "no-stack")


@dataclass(frozen=True, slots=True)
class RefusedFlag:
    flag: str
    reason: str
    takes_value: bool = True


# flags of features genserve does not have: passing one is an error, never a silent no-op
REFUSED = (
    RefusedFlag("--shard-uds-path", "genserve's shards talk over torch.distributed, not a gRPC socket"),
    RefusedFlag("--watermark-gamma", "watermarking is not supported (`watermark: true` is rejected too)"),
    RefusedFlag("--watermark-delta", "watermarking is not supported (`watermark: true` is rejected too)"),
    RefusedFlag("--ngrok", "ngrok tunnelling is not built in; put the server behind your own ingress",
                takes_value=False),
    RefusedFlag("--ngrok-authtoken", "ngrok tunnelling is not built in; put the server behind your own ingress"),
    RefusedFlag("--ngrok-edge", "ngrok tunnelling is not built in; put the server behind your own ingress"),
    RefusedFlag("--cuda-memory-fraction",
                "not supported: genserve sizes the KV cache from free memory; use --kv-cache-memory-fraction"),
)


def _bool_value(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value == "true"


def add_launcher_flags(group: argparse._ArgumentGroup) -> None:
    env = os.environ.get
    group.add_argument("--sharded", type=_bool_value, default=env("SHARDED"), metavar="true|false",
                       help="true: shard over every visible GPU unless --num-shard says how many; false: one "
                            "shard [env: SHARDED]")
    group.add_argument("--master-addr", default=env("MASTER_ADDR"),
                       help="torch.distributed rendezvous address of the shards [env: MASTER_ADDR] "
                            "(default: 127.0.0.1)")
    group.add_argument("--master-port", type=int, default=env("MASTER_PORT"),
                       help="torch.distributed rendezvous port [env: MASTER_PORT] (default: a free port)")
    group.add_argument("--weights-cache-override", default=env("WEIGHTS_CACHE_OVERRIDE"),
                       help="where Hub downloads go, as --huggingface-hub-cache [env: WEIGHTS_CACHE_OVERRIDE]")
    group.add_argument("--disable-custom-kernels", action="store_true",
                       default=env("DISABLE_CUSTOM_KERNELS", "").lower() in ("1", "true"),
                       help="run PyTorch ops instead of genserve's native kernels [env: DISABLE_CUSTOM_KERNELS]")
    group.add_argument("--enable-prefill-logprobs", action="store_true",
                       default=env("ENABLE_PREFILL_LOGPROBS", "").lower() in ("1", "true"),
                       help="accepted for TGI: prompt log-probabilities are always available here (computed "
                            "per prefill chunk, no extra memory) [env: ENABLE_PREFILL_LOGPROBS]")
    group.add_argument("--usage-stats", choices=USAGE_STATS, default=env("USAGE_STATS", "on"),
                       help="accepted for TGI: genserve collects and sends no usage statistics [env: USAGE_STATS]")
    group.add_argument("-e", "--env", action="store_true", dest="print_env",
                       help="print the runtime environment (versions, CPU, GPUs) at startup")
    for refused in REFUSED:
        env_name = refused.flag.lstrip("-").replace("-", "_").upper()
        if refused.takes_value:
            group.add_argument(refused.flag, default=env(env_name), help=argparse.SUPPRESS)
        else:
            group.add_argument(refused.flag, action="store_true", default=bool(env(env_name)),
                               help=argparse.SUPPRESS)


def refused_flag_error(args: argparse.Namespace) -> str | None:
    """The first refused flag that was set (on the command line or by its env var), as one line."""
    for refused in REFUSED:
        value = getattr(args, refused.flag.lstrip("-").replace("-", "_"))
        if value not in (None, False, ""):
            return f"`{refused.flag}` is not supported: {refused.reason}"
    return None


def apply_launcher_flags(args: argparse.Namespace) -> None:
    """Turn the launcher-only flags into the settings they stand for (env for the shards, num_shard, ...).

    Raises ValueError with a one-line message for a flag that cannot be honoured here."""
    error = refused_flag_error(args)
    if error:
        raise ValueError(error)
    if args.master_addr:
        os.environ["MASTER_ADDR"] = args.master_addr
    if args.master_port is not None:
        os.environ["MASTER_PORT"] = str(args.master_port)
    if args.weights_cache_override and not args.huggingface_hub_cache:
        args.huggingface_hub_cache = args.weights_cache_override
    if args.disable_custom_kernels:
        os.environ["GENSERVE_CPU_KERNELS"] = "0"  # read by genserve.server.kernels, here and in every shard
    if args.sharded is not None:
        args.num_shard = resolve_num_shard(args.sharded, int(args.num_shard))
    if args.usage_stats != "off":
        logger.debug("usage statistics (--usage-stats %s): genserve collects and sends none", args.usage_stats)
    if args.print_env:
        print(environment_report(), flush=True)


def resolve_num_shard(sharded: bool, num_shard: int) -> int:
    """TGI's --sharded: false means one shard; true means every visible GPU unless --num-shard is given."""
    if not sharded:
        if num_shard > 1:
            raise ValueError(f"`--sharded false` contradicts `--num-shard {num_shard}`")
        return 1
    if num_shard > 1:
        return num_shard
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        raise ValueError(f"`--sharded true` needs at least 2 GPUs or an explicit `--num-shard N`; {gpus} visible")
    return gpus


def resolve_hostname(flag_value: str | None) -> str:
    """The address to bind: --hostname, else TGI's HOSTNAME env var, else 0.0.0.0.

    Shells and Kubernetes set HOSTNAME to the machine's or pod's own name; binding to that name would leave
    localhost (probes through `kubectl port-forward`, sidecars) unable to connect, so a HOSTNAME that is a
    name rather than an address is logged and 0.0.0.0 is used."""
    if flag_value:
        return flag_value
    value = os.environ.get("HOSTNAME", "").strip()
    if not value:
        return "0.0.0.0"
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        logger.info("HOSTNAME=%s is a host name, not an address: binding 0.0.0.0 (pass --hostname to choose)",
                    value)
        return "0.0.0.0"


def environment_report() -> str:
    """What TGI's `--env` prints: versions, platform and accelerators, one `key: value` per line."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def package(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    lines = {
        "genserve": package("genserve"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "transformers": package("transformers"),
        "cuda": torch.version.cuda or "none",
        "gpus": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available() else "none",
    }
    return "\n".join(f"{key}: {value}" for key, value in lines.items())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
