"""The JSON log: the request line's fast path writes what the formatter would, and steps aside for handlers
added to ``keel.request``."""

from __future__ import annotations

import logging

import orjson
import pytest

from keel.config import LoggingConfig
from keel.observe.logs import JsonFormatter, log_request, request_logger, setup_logging, shutdown_logging

FIELDS = {"request_id": "req_1", "model": "smart", "attempts": [{"outcome": "ok", "ms": 1.5}], "cost_usd": None}


def test_the_request_line_is_the_formatters_line_and_other_handlers_still_see_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_logging(LoggingConfig(format="json"))
    seen: list[logging.LogRecord] = []
    try:
        with monkeypatch.context() as m:
            m.setattr(request_logger, "info", lambda *a, **k: pytest.fail("the fast path went through the logger"))
            log_request(FIELDS)  # the fast path: nobody else listens
        listener = logging.Handler()
        listener.emit = seen.append  # type: ignore[method-assign]
        request_logger.addHandler(listener)
        try:
            log_request({**FIELDS, "request_id": "req_2"})  # through the logger, for the listener
        finally:
            request_logger.removeHandler(listener)
    finally:
        shutdown_logging()
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["request_id"] for line in lines] == ["req_1", "req_2"]
    assert [r.fields["request_id"] for r in seen] == ["req_2"]  # type: ignore[attr-defined]
    record = logging.LogRecord("keel.request", logging.INFO, __file__, 1, "request", None, None)
    record.fields = FIELDS
    expected = orjson.loads(JsonFormatter().format(record))
    for line in lines:
        assert line.pop("ts")[-1] == "Z"
    assert lines[0] == {k: v for k, v in expected.items() if k != "ts"}
    assert lines[1] == {**lines[0], "request_id": "req_2"}
