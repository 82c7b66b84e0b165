"""Sans-I/O shapes of the PyGrid model-centric protocol, shared by the grid node and workers.

Nothing here does I/O. Requests are parsed from plain JSON values (``dict``) into small
frozen dataclasses, with :class:`gridfl.InvalidRequestError` naming the bad field;
responses are built as plain ``dict`` objects ready for ``json.dumps``.

Transports (docs/protocol.md has the full story):

* HTTP returns the bare ``data`` object; errors as ``{"error": "..."}`` with a status code.
* WebSocket frames are ``{"type", "data", "request_id"?}``; replies carry the same ``type``,
  the ``request_id`` if one came, and ``data`` (errors as ``data.error``).
* gridfl extension: a report may come as one WebSocket *binary* frame, a JSON header and
  the raw diff bytes (:func:`encode_binary_report`, :func:`split_binary_frame`); on a
  socket that negotiated :data:`BINARY_SUBPROTOCOL` the downloads (get-model, get-plan,
  get-protocol) are WebSocket requests too, answered by a binary frame
  (:func:`encode_binary_reply`).
"""

from __future__ import annotations

import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import pybase64

from gridfl._exceptions import InvalidRequestError

__all__ = [
    "AUTHENTICATE",
    "BINARY_SUBPROTOCOL",
    "CYCLE_REQUEST",
    "GET_MODEL",
    "GET_PLAN",
    "GET_PROTOCOL",
    "HOST_TRAINING",
    "MAX_BINARY_HEADER",
    "MAX_MESSAGE_VALUES",
    "MAX_NUM_SAMPLES",
    "MSG_AUTH_INVALID",
    "MSG_AUTH_REQUIRED",
    "MSG_AUTH_THIRD_PARTY",
    "MSG_INVALID_REQUEST_KEY",
    "MSG_MODEL_NOT_FOUND",
    "MSG_PLAN_NOT_FOUND",
    "MSG_PROTOCOL_NOT_FOUND",
    "MSG_WORKER_NOT_FOUND",
    "PLAN_VARIANTS",
    "REPORT",
    "SOCKET_PING",
    "WS_TYPES",
    "AssetRequest",
    "AuthenticateRequest",
    "CycleRequest",
    "ReportRequest",
    "accepted_response",
    "authenticate_response",
    "binary_report_data",
    "check_json_values",
    "check_text",
    "decode_diff",
    "echoable_request_id",
    "encode_binary_reply",
    "encode_binary_report",
    "encode_diff",
    "error_body",
    "parse_asset_request",
    "parse_authenticate",
    "parse_cycle_request",
    "parse_json",
    "parse_max_bytes",
    "parse_report",
    "parse_ws_frame",
    "rejected_response",
    "report_response",
    "select_subprotocol",
    "split_binary_frame",
    "ws_error",
    "ws_reply",
]

# --- message types (WebSocket `type`; the HTTP path is `/` + type) -------------------------
AUTHENTICATE = "model-centric/authenticate"
CYCLE_REQUEST = "model-centric/cycle-request"
REPORT = "model-centric/report"
HOST_TRAINING = "model-centric/host-training"
SOCKET_PING = "socket-ping"
#: downloads: HTTP ``GET /`` + type; WebSocket requests only with :data:`BINARY_SUBPROTOCOL`
GET_MODEL = "model-centric/get-model"
GET_PLAN = "model-centric/get-plan"
GET_PROTOCOL = "model-centric/get-protocol"
WS_TYPES = frozenset({AUTHENTICATE, CYCLE_REQUEST, REPORT, SOCKET_PING})

#: plan variants ``get-plan`` serves (``receive_operations_as``)
PLAN_VARIANTS = ("onnx", "tfjs", "torchscript", "list")

# --- error texts clients match on (PyGrid's wording) --------------------------------------
MSG_AUTH_REQUIRED = "Authentication is required, please pass an 'auth_token'."
MSG_AUTH_INVALID = "The 'auth_token' you sent is invalid."
MSG_AUTH_THIRD_PARTY = "The 'auth_token' you sent did not pass 3rd party validation."
MSG_INVALID_REQUEST_KEY = "Invalid request key!"
MSG_MODEL_NOT_FOUND = "Model ID not found!"
MSG_PLAN_NOT_FOUND = "Plan ID not found!"
MSG_PROTOCOL_NOT_FOUND = "Protocol ID not found!"
MSG_WORKER_NOT_FOUND = "Worker ID not found!"


# --- field helpers --------------------------------------------------------------------------
def _obj(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def check_text(value: str, what: str) -> str:
    """Refuse text no database can store: NUL characters and lone UTF-16 surrogates."""
    if "\x00" in value:
        raise InvalidRequestError(f"{what} must not contain control character NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{what} is not valid Unicode (a lone surrogate)") from None
    return value


#: most JSON values (objects, arrays and their members) one worker message may hold: a
#: report is a handful of fields and one long base64 string, so anything near this is
#: hostile, and refusing it before decoding keeps the parser's work linear in the bytes
#: with the constant of a normal report (64 MiB of ``[0,0,...]`` is 32M Python objects)
MAX_MESSAGE_VALUES = 4096


def parse_json(
    body: bytes | str, what: str = "the body", *, max_values: int | None = None, check: bool = True
) -> Any:
    """Decode JSON that the node can store and send back as JSON: every failure is an
    :class:`InvalidRequestError` naming what was wrong (bad UTF-8, syntax, nesting deeper
    than the decoder recurses, ``NaN``/``Infinity`` or a number beyond the float range,
    text no database stores; see :func:`check_json_values`).

    ``max_values`` caps the JSON values (a cheap count of ``,``, ``[``, ``{`` before
    decoding, an over-count since it also sees them inside strings). ``check=False``
    leaves the values to the caller (:func:`parse_ws_frame` checks a frame's).

        >>> parse_json('{"lr": 0.1}')
        {'lr': 0.1}
        >>> parse_json('{"lr": 1e999}')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gridfl._exceptions.InvalidRequestError: 'lr' is not a finite number ...
    """
    if max_values is not None:
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        count = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
        if count > max_values:
            raise InvalidRequestError(
                f"{what} holds more than {max_values} JSON values; a worker message has a "
                "few fields and carries its diff as one base64 string"
            )
    try:
        # float("1e999") is inf and the decoder takes NaN and Infinity: both are left as
        # they come and found, with their path, by check_json_values
        value = json.loads(body)
    except RecursionError:
        raise InvalidRequestError(f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise InvalidRequestError(f"{what} is not valid JSON: {e}") from None
    return check_json_values(value) if check else value


def check_json_values(value: Any, where: str = "") -> Any:
    """Refuse, naming the field, what JSON cannot carry back out or a database cannot
    store: a non-finite float (``NaN``, ``Infinity``, ``1e999``), an integer beyond the
    float range (JavaScript reads it as ``Infinity``), and text holding NUL or a lone
    UTF-16 surrogate, in any key or value at any depth. Returns ``value``.

        >>> check_json_values({"a": [1, 2.5, "x"]})
        {'a': [1, 2.5, 'x']}
    """
    stack = [(value, where)]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            _check_json_text(v, path)
        elif isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise InvalidRequestError(f"{_name(path)}: keys must be strings")
                inner = f"{path}.{_segment(k)}" if path else _segment(k)
                _check_json_text(k, inner, key=True)
                stack.append((item, inner))
        elif isinstance(v, (list, tuple)):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise InvalidRequestError(
                f"{_name(path)} is not a finite number (NaN, Infinity and numbers beyond "
                "the float range cannot be sent back as JSON)"
            )
        elif isinstance(v, int) and not isinstance(v, bool) and _finite(v) is None:
            raise InvalidRequestError(f"{_name(path)} is an integer beyond the float range")
    return value


def _segment(key: str) -> str:
    """A key as it may appear in an error message: printable ASCII, escaped otherwise (a
    message must not carry the very text it refuses), and cut short."""
    if key.isascii() and key.isprintable() and len(key) <= 64:
        return key
    return ascii(key[:64])[1:-1]


def _name(path: str) -> str:
    return f"'{path}'" if path else "the value"


def _check_json_text(text: str, path: str, *, key: bool = False) -> None:
    if text.isascii() and "\x00" not in text:  # isascii is O(1), the NUL search a memchr
        return
    what = f"the key {_name(path)}" if key else _name(path)
    check_text(text, what)


@overload
def _str(data: dict, key: str, *, required: Literal[True] = ..., max_len: int = ...) -> str: ...
@overload
def _str(data: dict, key: str, *, required: bool, max_len: int = ...) -> str | None: ...
def _str(data: dict, key: str, *, required: bool = True, max_len: int = 4096) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise InvalidRequestError(f"'{key}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRequestError(f"'{key}' must be a string")
    if isinstance(value, int) and abs(value) >= 1 << 63:
        raise InvalidRequestError(f"'{key}' is too long")
    value = str(value)
    if required and not value:
        raise InvalidRequestError(f"'{key}' must not be empty")
    if len(value) > max_len:
        raise InvalidRequestError(f"'{key}' is too long")
    return check_text(value, f"'{key}'")


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not a finite JSON number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)  # an int beyond float range raises OverflowError
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


#: largest ``num_samples`` (2**53 - 1: exact in a double, JavaScript's safe integer)
MAX_NUM_SAMPLES = (1 << 53) - 1


def _number(data: dict, key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    f = _finite(value)
    if f is None or f < 0:
        raise InvalidRequestError(f"'{key}' needs to be a positive number")
    return f


# --- requests -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuthenticateRequest:
    model_name: str
    model_version: str | None = None
    auth_token: str | None = None


@dataclass(frozen=True)
class CycleRequest:
    worker_id: str
    model: str
    version: str | None = None
    ping: float | None = None
    download: float | None = None
    upload: float | None = None
    #: gridfl extension: seconds the node may hold a rejection until a cycle opens
    wait: float = 0.0


#: longest ``wait`` a cycle request may ask for
MAX_WAIT = 60.0
#: most cycles (and checkpoints) one admin status call lists (``?cycles=``)
MAX_STATUS_CYCLES = 1000


@dataclass(frozen=True)
class ReportRequest:
    worker_id: str
    request_key: str
    diff: bytes = field(repr=False)
    num_samples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AssetRequest:
    """Query of ``get-model`` / ``get-plan`` / ``get-protocol``."""

    worker_id: str
    request_key: str
    asset_id: int
    receive_operations_as: str | None = None


def parse_authenticate(data: Any) -> AuthenticateRequest:
    data = _obj(data, "authenticate")
    token = data.get("auth_token")
    if token is not None and not isinstance(token, str):
        raise InvalidRequestError("'auth_token' must be a string")
    return AuthenticateRequest(
        model_name=_str(data, "model_name"),
        model_version=_str(data, "model_version", required=False) or None,
        auth_token=token or None,
    )


def parse_cycle_request(data: Any) -> CycleRequest:
    data = _obj(data, "cycle-request")
    return CycleRequest(
        worker_id=_str(data, "worker_id"),
        model=_str(data, "model"),
        version=_str(data, "version", required=False) or None,
        ping=_number(data, "ping"),
        download=_number(data, "download"),
        upload=_number(data, "upload"),
        wait=_wait(data),
    )


def _wait(data: dict[str, Any]) -> float:
    value = data.get("wait", 0)
    if value is None:
        return 0.0
    f = _finite(value)
    if f is None or not 0 <= f <= MAX_WAIT:
        raise InvalidRequestError(f"'wait' must be a number of seconds from 0 to {MAX_WAIT:g}")
    return f


def decode_diff(value: Any) -> bytes:
    """Decode the report's ``diff``: standard base64 (padded) of State bytes, or the raw
    bytes a binary WebSocket report carried after its header."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise InvalidRequestError(
                "'diff' must not be empty: the binary frame has no bytes after its header"
            )
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError("'diff' must be a non-empty base64 string")
    try:
        return b64decode(value)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("'diff' is not valid base64") from None


def b64decode(value: str) -> bytes:
    """Strict standard base64 (padded, no stray characters) to bytes.

    pybase64 (SIMD) rather than the standard library: a CNN diff is 9 MB of base64,
    which the standard library decodes in ~50 ms and pybase64 in ~1 ms.
    """
    return pybase64.b64decode(value, validate=True)


def b64encode(data: bytes) -> str:
    """Bytes to standard base64 text (the encoding of diffs and hosted blobs)."""
    return pybase64.b64encode(data).decode("ascii")


def encode_diff(diff: bytes) -> str:
    return b64encode(diff)


def parse_report(data: Any) -> ReportRequest:
    data = _obj(data, "report")
    worker_id = _str(data, "worker_id")
    request_key = _str(data, "request_key")
    diff = decode_diff(data.get("diff"))
    num_samples = data.get("num_samples")
    if num_samples is not None and (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or not 0 < num_samples <= MAX_NUM_SAMPLES
    ):
        raise InvalidRequestError(
            f"'num_samples' must be a positive integer (at most {MAX_NUM_SAMPLES})"
        )
    metrics = data.get("metrics")
    if metrics is None:
        metrics = {}
    if not isinstance(metrics, dict):
        raise InvalidRequestError("'metrics' must be an object of name -> number")
    if len(metrics) > 32:
        raise InvalidRequestError("at most 32 metrics per report")
    clean: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > 64:
            raise InvalidRequestError("metric names must be strings of at most 64 characters")
        check_text(name, "a metric name")
        f = _finite(value)
        if f is None:
            raise InvalidRequestError(f"metric {name!r} must be a finite number")
        clean[name] = f
    return ReportRequest(worker_id, request_key, diff, num_samples, clean)


def parse_asset_request(query: Any, id_key: str, *, variant: bool = False) -> AssetRequest:
    query = _obj(query, "query")
    raw = _str(query, id_key)
    try:
        asset_id = int(raw)
    except ValueError:
        raise InvalidRequestError(f"'{id_key}' must be an integer") from None
    if not 0 <= asset_id < 1 << 63:  # no database row has such an id
        asset_id = -1
    ops = _str(query, "receive_operations_as", required=False) if variant else None
    if ops is not None and ops not in PLAN_VARIANTS:
        raise InvalidRequestError(
            f"'receive_operations_as' must be one of {', '.join(PLAN_VARIANTS)}; got {ops!r}"
        )
    return AssetRequest(_str(query, "worker_id"), _str(query, "request_key"), asset_id, ops)


# --- WebSocket frames -----------------------------------------------------------------------
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


def encode_binary_report(data: dict[str, Any], request_id: Any = None) -> bytes:
    """A report as one binary frame: 4-byte big-endian header length, the UTF-8 JSON
    header ``{"type": REPORT, "request_id"?, "data": {every field but diff}}``, then the
    raw State bytes of ``data["diff"]``."""
    header = {"type": REPORT, "data": {k: v for k, v in data.items() if k != "diff"}}
    return _binary_frame(header, request_id, data["diff"])


def _binary_frame(header: dict[str, Any], request_id: Any, payload: bytes) -> bytes:
    """4-byte big-endian header length, the compact UTF-8 JSON header, the payload."""
    if request_id is not None:
        header = {**header, "request_id": request_id}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join((len(head).to_bytes(_LEN, "big"), head, payload))


def split_binary_frame(frame: bytes) -> tuple[bytes, bytes]:
    """``(header, payload)`` of a binary frame; a 400 if the framing is broken."""
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
    return frame[_LEN : _LEN + n], frame[_LEN + n :]


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


def binary_report_data(kind: str, data: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """The report ``data`` of a binary frame: its header's ``data`` plus the payload as
    ``diff`` (then validated by :func:`parse_report`, as a JSON report is)."""
    if kind != REPORT:
        raise InvalidRequestError(
            f"binary frame: only {REPORT!r} may be sent as a binary frame, got {kind!r} "
            "(send other messages as JSON text frames)"
        )
    if "diff" in data:
        raise InvalidRequestError(
            "binary frame: the header must not carry 'diff'; the diff bytes follow the header"
        )
    return {**data, "diff": payload}


# --- responses ------------------------------------------------------------------------------
def authenticate_response(worker_id: str, requires_speed_test: bool) -> dict[str, Any]:
    return {
        "status": "success",
        "worker_id": worker_id,
        "requires_speed_test": bool(requires_speed_test),
    }


def accepted_response(
    *,
    request_key: str,
    model: str,
    version: str,
    model_id: int,
    plans: dict[str, int],
    protocols: dict[str, int],
    client_config: dict[str, Any],
    plan_digests: dict[str, str] | None = None,
) -> dict[str, Any]:
    """PyGrid's accepted reply; ``plan_digests`` (gridfl extension, left out when empty):
    the SHA-256 (hex) of each plan's ``onnx`` variant, so a worker that already holds
    those bytes from an earlier cycle need not download them again."""
    out = {
        "status": "accepted",
        "request_key": request_key,
        "version": version,
        "model": model,
        "plans": plans,
        "protocols": protocols,
        "client_config": client_config,
        "model_id": model_id,
    }
    if plan_digests:
        out["plan_digests"] = plan_digests
    return out


def rejected_response(timeout: int | None, reason: str) -> dict[str, Any]:
    """A rejection: ``timeout`` is integer seconds until a retry may succeed; None = done."""
    out: dict[str, Any] = {"status": "rejected", "reason": reason}
    if timeout is not None:
        out["timeout"] = max(0, int(timeout))
    return out


def report_response() -> dict[str, Any]:
    return {"status": "success"}
