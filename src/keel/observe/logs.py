"""Structured JSON logs that never block the event loop.

Records are formatted as one JSON object per line and handed to a background thread through a queue
(``QueueHandler``/``QueueListener``), so a slow stdout or disk never stalls a request. Only the fields a caller
puts in ``extra={"fields": {...}}`` are logged: request and response bodies, headers and keys never are.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

import orjson

from keel.config import LoggingConfig

__all__ = ["JsonFormatter", "request_logger", "setup_logging"]

request_logger = logging.getLogger("keel.request")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        extra = " ".join(f"{k}={v}" for k, v in fields.items()) if isinstance(fields, dict) else ""
        base = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        text = f"{base} {extra}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


_listener: logging.handlers.QueueListener | None = None


def setup_logging(cfg: LoggingConfig) -> None:
    """Route the ``keel`` loggers through a queue to stderr; idempotent."""
    global _listener
    if _listener is not None:
        _listener.stop()
    sink = logging.StreamHandler(sys.stderr)
    sink.setFormatter(JsonFormatter() if cfg.format == "json" else ConsoleFormatter())
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(q, sink, respect_handler_level=False)
    _listener.start()
    root = logging.getLogger("keel")
    root.handlers[:] = [logging.handlers.QueueHandler(q)]
    root.setLevel(cfg.level.upper())
    root.propagate = False
    # The request log is governed by `requests`, not by the level: one line per request is the contract.
    request_logger.setLevel(logging.INFO)
    request_logger.disabled = not cfg.requests


def shutdown_logging() -> None:
    """Flush queued records (at process exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
