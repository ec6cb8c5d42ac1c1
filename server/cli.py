"""The `genserve` command."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genserve", description="Serve large language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare-default-model", help="convert the built-in SmolLM2 model once into the cache")
    download = sub.add_parser("download", help="download (or convert) a model into the cache and exit")
    download.add_argument("--model-id", default=None)
    download.add_argument("--revision", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from genserve.server.model_files import prepare_default_model, resolve_model

    if args.command == "prepare-default-model":
        print(prepare_default_model())
    elif args.command == "download":
        print(resolve_model(args.model_id, args.revision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
