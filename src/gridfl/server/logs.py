"""Log output of ``gridfl serve``: human text, or one JSON object per line for collectors
(Loki, Elasticsearch, CloudWatch...)."""

from __future__ import annotations

import json
import logging
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "exc"?}``, one line per record.

    >>> import sys
    >>> handler = logging.StreamHandler(sys.stdout)
    >>> handler.setFormatter(JsonFormatter())
    >>> log = logging.getLogger("gridfl.example")
    >>> log.addHandler(handler)
    >>> log.warning("cycle %d expired", 3)  # doctest: +ELLIPSIS
    {"ts": "...Z", "level": "warning", "logger": "gridfl.example", "message": "cycle 3 expired"}
    >>> log.removeHandler(handler)
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Root logging for a node process; ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
