"""Structured JSON logs that never block the event loop.

Records are formatted where they are emitted (orjson: microseconds) and appended to an in-memory buffer; a
background thread writes the buffer out in one ``write`` every ``FLUSH_INTERVAL_S`` (or sooner when it fills). So
a slow stdout or disk never stalls a request, and, unlike a queue handed to a thread per record, the event loop
and the writer do not wake each other (and trade the GIL) on every request: that handoff cost more CPU than
the rest of a request's logging. Only the fields a caller puts in ``extra={"fields": {...}}`` are logged:
request and response bodies, headers and keys never are.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

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


FLUSH_INTERVAL_S = 0.2
MAX_BUFFERED = 2000  # lines; past this the writer is woken at once


class BufferedHandler(logging.Handler):
    """Format on emit, write in batches from a daemon thread. ``close()`` flushes what is left."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._lines: list[str] = []
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="keel-log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)  # list.append is atomic under the GIL
        if len(self._lines) >= MAX_BUFFERED:
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # the stream went away (shutdown, closed pipe): drop, never raise
                pass

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=2)
        self.flush()
        super().close()


_handler: BufferedHandler | None = None


def setup_logging(cfg: LoggingConfig) -> None:
    """Send the ``keel`` loggers' records to stderr through a :class:`BufferedHandler`; idempotent."""
    global _handler
    if _handler is not None:
        _handler.close()
    _handler = BufferedHandler(sys.stderr)
    _handler.setFormatter(JsonFormatter() if cfg.format == "json" else ConsoleFormatter())
    root = logging.getLogger("keel")
    root.handlers[:] = [_handler]
    root.setLevel(cfg.level.upper())
    root.propagate = False
    # The request log is governed by `requests`, not by the level: one line per request is the contract.
    request_logger.setLevel(logging.INFO)
    request_logger.disabled = not cfg.requests


def shutdown_logging() -> None:
    """Write out buffered records (at shutdown)."""
    global _handler
    if _handler is not None:
        _handler.close()
        _handler = None
