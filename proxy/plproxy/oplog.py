"""The operational log: one line per event on stdout, JSON or text, never prompt bodies or credentials.

Events are names with fields (`log.info("call", extra={"fields": {...}})`); the formatter puts the
fields beside the event name. Bodies are the product and go only to the store.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        text = " ".join(f"{key}={value}" for key, value in fields.items()) if isinstance(fields, dict) else ""
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {record.getMessage()} {text}".rstrip()
        if record.exc_info and record.exc_info[0] is not None:
            line += f" error={record.exc_info[0].__name__}: {record.exc_info[1]}"
        return line


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # aiohttp's own access log would repeat plproxy's call line without its fields
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
