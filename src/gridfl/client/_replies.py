"""
What the worker SDK needs of the protocol besides :mod:`gridfl._messages` (whose message
types it reuses): download paths, reply unwrapping, error classes.
Everything here is pure (no I/O).
"""

from __future__ import annotations

from typing import Any

from gridfl._exceptions import (
    AuthenticationError,
    GridError,
    NotFoundError,
    error_for_status,
)
from gridfl._messages import (  # noqa: F401 - re-exported
    AUTHENTICATE,
    CYCLE_REQUEST,
    GET_MODEL,
    GET_PLAN,
    GET_PROTOCOL,
    REPORT,
    parse_timeout,
)

SPEED_TEST = "model-centric/speed-test"

#: ``receive_operations_as`` value that selects gridfl's ONNX plan variant.
PLAN_VARIANT = "onnx"

# Node error texts that mean "bad credentials" whatever status carried them (PyGrid
# answers authentication failures with 400, and WebSocket replies carry no status).
_AUTH_TEXTS = (
    "auth_token",
    "authentication is required",
)


def error_class(status: int | None, message: str) -> type[GridError]:
    """The :class:`GridError` subclass for a node error reply."""
    low = message.lower()
    if any(t in low for t in _AUTH_TEXTS):
        return AuthenticationError
    if "not found" in low and status in (None, 400, 404):
        return NotFoundError  # PyGrid answers "Model ID not found!" etc. with 400
    return error_for_status(status)


def node_error(message: Any, *, status: int | None = None, call: str | None = None) -> GridError:
    """Build the exception for an error the node sent back (its message kept verbatim)."""
    text = str(message).strip() or f"HTTP {status}"
    exc = error_class(status, text)(text)
    exc.status = status  # type: ignore[attr-defined]
    exc.call = call  # type: ignore[attr-defined]
    return exc


def unwrap_reply(body: Any, *, call: str, status: int | None = None) -> dict[str, Any]:
    """The ``data`` object of a node reply, raising the node's error if it carries one.

    Accepts the bare object (gridfl over HTTP, PyGrid master), the ``{type, data}``
    envelope (WebSocket, PyGrid dev over HTTP) and ``{"error": ...}`` at either level.
    """
    if not isinstance(body, dict):
        raise GridError(f"malformed reply to {call}: expected a JSON object, got {body!r:.200}")
    if "error" in body and body["error"] is not None:
        raise node_error(body["error"], status=status, call=call)
    data = body
    if isinstance(body.get("data"), dict) and ("type" in body or "request_id" in body):
        data = body["data"]
    if "error" in data and data["error"] is not None:
        # a WebSocket error may carry the HTTP status the node would have answered with
        code = data.get("status_code", data.get("http_status"))
        if status is None and isinstance(code, int) and not isinstance(code, bool):
            status = code
        raise node_error(data["error"], status=status, call=call)
    return data
