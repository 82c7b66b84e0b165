"""The one table mapping errors to HTTP status codes and WebSocket error replies."""

from __future__ import annotations

import logging

from gridfl._exceptions import (
    ConfigError,
    GridError,
    ModelError,
    PlanInputError,
    PlanLoadError,
    StateError,
)

log = logging.getLogger("gridfl.server")

#: non-GridError domain errors and their HTTP status (GridError carries ``http_status``)
STATUS = {
    ConfigError: 400,
    StateError: 400,
    ModelError: 400,
    PlanLoadError: 400,
    PlanInputError: 400,
}


def to_status(exc: BaseException) -> tuple[int, str]:
    """``(http status, message)`` for any exception; unknown ones are 500 and logged."""
    if isinstance(exc, GridError):
        return exc.http_status, str(exc)
    for cls, status in STATUS.items():
        if isinstance(exc, cls):
            return status, str(exc)
    if type(exc).__name__ == "ClientDisconnect":  # starlette: the client went away mid-body
        log.info("client disconnected while sending its request")
        return 400, "client disconnected"
    log.error("internal error", exc_info=exc)
    return 500, f"internal server error ({type(exc).__name__})"
