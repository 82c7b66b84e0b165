"""WebSocket frames: the JSON envelope, and gridfl's binary report and download frames."""

from __future__ import annotations

import json
from typing import Any

from gridfl._exceptions import InvalidRequestError
from gridfl._messages.fields import _obj, check_json_values
from gridfl._messages.names import REPORT, SECURE_AGGREGATION


def parse_ws_frame(frame: Any) -> tuple[str, dict[str, Any], Any]:
    """Split a decoded frame into ``(type, data, request_id)``; raise on a malformed one."""
    frame = _obj(frame, "message")
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise InvalidRequestError("message 'type' is required")
    data = frame.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidRequestError("message 'data' must be an object")
    request_id = check_json_values(frame.get("request_id"), "request_id")
    return kind, check_json_values(data), request_id


def echoable_request_id(frame: Any) -> Any:
    """The frame's ``request_id`` if a reply can carry it back as JSON, else None."""
    request_id = frame.get("request_id") if isinstance(frame, dict) else None
    try:
        return check_json_values(request_id)
    except InvalidRequestError:
        return None


def ws_reply(kind: str | None, data: dict[str, Any], request_id: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": kind, "data": data} if kind else dict(data)
    if request_id is not None:
        out["request_id"] = request_id
    return out


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": message, **extra}


def ws_error(kind: str | None, message: str, request_id: Any = None, **extra: Any) -> dict:
    return ws_reply(kind, error_body(message, **extra), request_id)


# --- binary report frames (gridfl extension) -------------------------------------------------
#: WebSocket subprotocol a gridfl node selects when a client offers it: the socket speaks
#: the usual JSON text frames, takes reports as binary frames, and serves downloads
#: (get-model, get-plan and get-protocol requests are JSON text frames, answered by one
#: binary frame, :func:`encode_binary_reply`). syft.js offers no subprotocol, so nothing
#: changes for it; a client of a node that does not select it (PyGrid) sends JSON reports.
BINARY_SUBPROTOCOL = "gridfl.binary.2"
#: largest JSON header of a binary frame (it holds ids, num_samples and metrics only)
MAX_BINARY_HEADER = 64 * 1024
_LEN = 4  # the header length prefix: 4 bytes, big-endian
_PAYLOAD_ALIGNMENT = 8  # a frame's payload starts at a multiple of this from its start


#: the messages that may travel as a binary frame, and where each keeps the bytes that
#: follow the header: a report's State (``diff``), a masked input's packed vector
BINARY_PAYLOADS: dict[str, tuple[str, ...]] = {
    REPORT: ("diff",),
    SECURE_AGGREGATION: ("message", "vector"),
}


_MISSING = object()


def _at(data: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` in nested objects, or ``_MISSING``."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return _MISSING
        data = data[key]
    return data


def binary_payload(kind: str, data: dict[str, Any]) -> bytes | bytearray | memoryview | None:
    """The bytes a message of ``kind`` would send after a binary frame's header, or None
    when it has none (it goes as JSON text).

    >>> binary_payload(SECURE_AGGREGATION, {"message": {"vector": b"v"}})
    b'v'
    """
    value = _at(data, BINARY_PAYLOADS.get(kind, ()))
    return value if isinstance(value, (bytes, bytearray, memoryview)) else None


def with_payload(kind: str, data: dict[str, Any], value: Any = _MISSING) -> dict[str, Any]:
    """A copy of a message's ``data`` with its payload (where :data:`BINARY_PAYLOADS`
    says) set to ``value``, or taken out when no value is given. The objects on the way
    are copied; ``data`` is left as it was.

    >>> with_payload(SECURE_AGGREGATION, {"stage": "s", "message": {"vector": b"v"}}, "dg==")
    {'stage': 's', 'message': {'vector': 'dg=='}}
    """
    *outer, leaf = BINARY_PAYLOADS[kind]
    out = dict(data)
    holder = out
    for key in outer:
        inner = holder.get(key)
        if not isinstance(inner, dict):
            raise InvalidRequestError(
                f"binary frame: the header's data must carry '{key}' as an object; the "
                f"'{leaf}' bytes follow the header"
            )
        holder[key] = holder = dict(inner)
    if value is _MISSING:
        holder.pop(leaf, None)
    else:
        holder[leaf] = value
    return out


def encode_binary_report(
    data: dict[str, Any], request_id: Any = None, kind: str = REPORT
) -> bytes:
    """A report (or a masked input) as one binary frame: 4-byte big-endian header length,
    the UTF-8 JSON header ``{"type": kind, "request_id"?, "data": {every field but the
    payload}}``, then the payload's raw bytes (a report's State, a packed masked vector)."""
    payload = binary_payload(kind, data)
    if payload is None:
        raise ValueError(f"a {kind!r} message without its bytes cannot be a binary frame")
    header = {"type": kind, "data": with_payload(kind, data)}
    return _binary_frame(header, request_id, payload)


def _binary_frame(
    header: dict[str, Any], request_id: Any, payload: bytes | bytearray | memoryview
) -> bytes:
    """4-byte big-endian header length, the compact UTF-8 JSON header, the payload.

    The header ends in spaces (JSON whitespace) up to a multiple of 8 bytes from the
    frame's start, so the payload lies where it would in a buffer of its own: a diff's
    float tensors, read in place, are then as aligned as in the State itself (numpy and
    BLAS read misaligned floats several times slower).
    """
    if request_id is not None:
        header = {**header, "request_id": request_id}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-(_LEN + len(head)) % _PAYLOAD_ALIGNMENT)
    return b"".join((len(head).to_bytes(_LEN, "big"), head, payload))


def _header_length(frame: bytes) -> int:
    """The header length a binary frame starts with; a 400 if the framing is broken."""
    if len(frame) < _LEN:
        raise InvalidRequestError(
            f"binary frame of {len(frame)} bytes is truncated: it must start with a "
            f"{_LEN}-byte big-endian header length"
        )
    n = int.from_bytes(frame[:_LEN], "big")
    if n > MAX_BINARY_HEADER:
        raise InvalidRequestError(
            f"binary frame header length {n} is larger than {MAX_BINARY_HEADER} bytes"
        )
    if n > len(frame) - _LEN:
        raise InvalidRequestError(
            f"binary frame header length {n} runs past the end of the frame "
            f"({len(frame) - _LEN} bytes follow the length)"
        )
    return n


def split_binary_frame(frame: bytes) -> tuple[bytes, bytes]:
    """``(header, payload)`` of a binary frame; a 400 if the framing is broken.

    >>> split_binary_frame(encode_binary_reply("model-centric/get-model", b"xy"))[1]
    b'xy'
    """
    n = _header_length(frame)
    return frame[_LEN : _LEN + n], frame[_LEN + n :]


def split_binary_report(frame: bytes) -> tuple[bytes, memoryview]:
    """As :func:`split_binary_frame`, the payload a read-only view of ``frame``: the node
    parses a report's diff in place instead of copying a model-sized slice.

    >>> header, payload = split_binary_report(encode_binary_report({"diff": b"xy"}))
    >>> bytes(payload), json.loads(header)["type"]
    (b'xy', 'model-centric/report')
    """
    n = _header_length(frame)
    return frame[_LEN : _LEN + n], memoryview(frame)[_LEN + n :]


def select_subprotocol(offered: Any) -> str | None:
    """:data:`BINARY_SUBPROTOCOL` if a client ``offered`` it, else None (JSON only)."""
    return BINARY_SUBPROTOCOL if BINARY_SUBPROTOCOL in (offered or ()) else None


def encode_binary_reply(kind: str, payload: bytes, request_id: Any = None) -> bytes:
    """A download's reply as one binary frame: 4-byte big-endian header length, the UTF-8
    JSON header ``{"type": kind, "request_id"?}``, then the raw bytes (the HTTP body)."""
    return _binary_frame({"type": kind}, request_id, payload)


def parse_max_bytes(data: dict[str, Any]) -> int | None:
    """The optional ``max_bytes`` of a download request over the socket: the largest
    payload the client takes in one frame (a larger one is refused with 413, so the client
    can download it over HTTP instead of having its socket closed with 1009)."""
    value = data.get("max_bytes")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError("'max_bytes' must be a non-negative integer")
    return value


def binary_report_data(
    kind: str, data: dict[str, Any], payload: bytes | memoryview
) -> dict[str, Any]:
    """The ``data`` of a binary frame: its header's ``data`` plus the payload where the
    message keeps it (:data:`BINARY_PAYLOADS`), then validated as the same message sent
    as JSON is."""
    if kind not in BINARY_PAYLOADS:
        kinds = " and ".join(repr(k) for k in BINARY_PAYLOADS)
        raise InvalidRequestError(
            f"binary frame: only {kinds} (a masked input) may be sent as a binary frame, "
            f"got {kind!r} (send other messages as JSON text frames)"
        )
    path = BINARY_PAYLOADS[kind]
    if _at(data, path) is not _MISSING:
        raise InvalidRequestError(
            f"binary frame: the header must not carry '{path[-1]}'; the {path[-1]} bytes "
            "follow the header"
        )
    return with_payload(kind, data, payload)
