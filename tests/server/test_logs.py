"""``gridfl serve --log-format json``: one JSON object per log line."""

from __future__ import annotations

import json
import logging

from gridfl.server.logs import JsonFormatter


def test_json_lines_carry_level_logger_message_and_exception():
    record = logging.LogRecord("gridfl.server", logging.WARNING, __file__, 1,
                               "database unavailable: %s", ("timeout",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "warning" and entry["logger"] == "gridfl.server"
    assert entry["message"] == "database unavailable: timeout"
    assert entry["ts"].endswith("Z") and "exc" not in entry
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in entry["exc"] and "\n" not in JsonFormatter().format(record)
