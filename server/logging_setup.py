"""Logging: human-readable lines, or one JSON object per line (`--json-output`) with request ids."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

# tensor-parallel ranks are fresh interpreters: they read the server's choice from here
JSON_OUTPUT_ENV = "GENSERVE_JSON_OUTPUT"


class JsonFormatter(logging.Formatter):
    def __init__(self, rank: int | None = None) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        if self.rank is not None:
            entry["rank"] = self.rank
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if fields:
            entry["fields"] = fields
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, rank: int | None = None) -> None:
        where = f"rank{rank} " if rank is not None else ""
        super().__init__(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} request_id={request_id}" if request_id else line


def configure_logging(json_output: bool = False, level: str | int = "INFO", rank: int | None = None) -> None:
    """Send every log record (ours and uvicorn's) to stdout in one format; `rank` tags a TP worker's lines."""
    os.environ[JSON_OUTPUT_ENV] = "1" if json_output else "0"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(rank) if json_output else TextFormatter(rank))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
