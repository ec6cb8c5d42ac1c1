"""The adapters' fetch step, run in the server image beside the model's download (init container or fill Job):

  python -m genserve.operator.adapter_fetch --into /data/adapters NAME=hf://org/name@rev NAME=s3://bucket/prefix

Each adapter is downloaded by the model's own fetchers (genserve.server.model_files: the Hub cache, the S3
copy) and linked at <into>/<name>, relative, so the link holds under any mount point. Only the standard
library and the server's fetchers are imported: the operator's dependencies are not in that image.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REQUIRED_FILES = ("adapter_config.json",)
WEIGHT_FILES = ("adapter_model.safetensors",)


def fetch(source: str) -> Path:
    from genserve.server.model_files import download_from_hub, download_from_s3

    if source.startswith("s3://"):
        return download_from_s3(source)
    repo, _, revision = source.removeprefix("hf://").partition("@")
    return download_from_hub(repo, revision or None)


def check_adapter(name: str, folder: Path) -> None:
    missing = [f for f in REQUIRED_FILES + WEIGHT_FILES if not (folder / f).is_file()]
    if missing:
        raise SystemExit(f"adapter {name}: {folder} has no {', '.join(missing)} (a PEFT LoRA folder holds "
                         f"{' and '.join(REQUIRED_FILES + WEIGHT_FILES)})")


def link(into: Path, name: str, target: Path) -> Path:
    """Point <into>/<name> at target, replacing an older link in one rename."""
    into.mkdir(parents=True, exist_ok=True)
    path = into / name
    staged = into / f".{name}.link"
    staged.unlink(missing_ok=True)
    staged.symlink_to(os.path.relpath(target.resolve(), into.resolve()), target_is_directory=True)
    os.replace(staged, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'adapter_fetch'}")
    parser.add_argument("--into", required=True, type=Path, help="folder of the adapters' links")
    parser.add_argument("adapters", nargs="+", metavar="NAME=SOURCE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for item in args.adapters:
        name, sep, source = item.partition("=")
        if not sep or not name or "/" in name or name in (".", ".."):
            parser.error(f"{item!r}: expected NAME=SOURCE")
        folder = fetch(source)
        check_adapter(name, folder)
        print(f"{name}={link(args.into, name, folder)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
