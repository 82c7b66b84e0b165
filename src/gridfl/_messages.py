"""Sans-I/O shapes of the PyGrid model-centric protocol, shared by the grid node and workers.

Nothing here does I/O. Every message is a small frozen dataclass both sides use: its
``to_json()`` builds the JSON value to send (requests on the worker, responses on the node);
``parse_*`` reads one back. Request parsers are the node's strict gate (an
:class:`gridfl.InvalidRequestError` naming the bad field); response parsers are the worker's
tolerant reading of what gridfl and PyGrid nodes send (a :class:`gridfl.GridError` only
when a reply lacks what the worker needs). Field ``metadata`` holds the JSON-schema
constraints the node's OpenAPI description is generated from (server/openapi.py).

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
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, overload

import pybase64

from gridfl._exceptions import CycleStatusError, GridError, GridflError, InvalidRequestError

__all__ = [
    "AUTHENTICATE",
    "BINARY_SUBPROTOCOL",
    "CYCLE_REQUEST",
    "EVALUATION",
    "EVALUATION_REPORT",
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
    "SECURE_AGGREGATION",
    "SOCKET_PING",
    "WS_TYPES",
    "AssetRequest",
    "AuthenticateRequest",
    "AuthenticateResponse",
    "CycleAccepted",
    "CycleRejected",
    "CycleRequest",
    "DashboardSignIn",
    "EvaluationReport",
    "ReportRequest",
    "ReportResponse",
    "SecAggRequest",
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
    "parse_authenticate_response",
    "parse_cycle_request",
    "parse_cycle_response",
    "parse_dashboard_sign_in",
    "parse_evaluation_report",
    "parse_json",
    "parse_max_bytes",
    "parse_report",
    "parse_report_response",
    "parse_secagg",
    "parse_timeout",
    "parse_ws_frame",
    "select_subprotocol",
    "split_binary_frame",
    "split_binary_report",
    "ws_error",
    "ws_reply",
]

# --- message types (WebSocket `type`; the HTTP path is `/` + type) -------------------------
AUTHENTICATE = "model-centric/authenticate"
CYCLE_REQUEST = "model-centric/cycle-request"
REPORT = "model-centric/report"
HOST_TRAINING = "model-centric/host-training"
SOCKET_PING = "socket-ping"
#: gridfl extension: one stage of secure aggregation (docs/secure-aggregation.md)
SECURE_AGGREGATION = "model-centric/secure-aggregation"
#: downloads: HTTP ``GET /`` + type; WebSocket requests only with :data:`BINARY_SUBPROTOCOL`
GET_MODEL = "model-centric/get-model"
GET_PLAN = "model-centric/get-plan"
GET_PROTOCOL = "model-centric/get-protocol"
#: gridfl extension: the metrics of an evaluation cycle (no diff; docs/worker.md)
EVALUATION_REPORT = "model-centric/evaluation-report"
WS_TYPES = frozenset(
    {AUTHENTICATE, CYCLE_REQUEST, REPORT, SOCKET_PING, SECURE_AGGREGATION, EVALUATION_REPORT}
)
#: the capability a worker names in its cycle request (``capabilities``) to be placed in
#: evaluation cycles, and the ``kind`` of such a cycle in the accepted reply; syft.js
#: never sends it, so it only ever receives training cycles
EVALUATION = "evaluation"

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
        # counted on the text or the bytes as they came: no copy of a 9 MB report
        if isinstance(body, str):
            count = body.count(",") + body.count("[") + body.count("{")
        else:
            count = body.count(b",") + body.count(b"[") + body.count(b"{")
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
#: longest ``wait`` a cycle request may ask for
MAX_WAIT = 60.0
#: most protocol names a cycle request may list
MAX_WORKER_PROTOCOLS = 16
#: most cycles (and checkpoints) one admin status call lists (``?cycles=``)
MAX_STATUS_CYCLES = 1000


def _present(pairs: dict[str, Any]) -> dict[str, Any]:
    """``pairs`` without the ``None`` values: optional fields are left out, not sent null."""
    return {k: v for k, v in pairs.items() if v is not None}


@dataclass(frozen=True)
class AuthenticateRequest:
    """``model-centric/authenticate``: a worker asks for a worker id in a process.

    >>> AuthenticateRequest("mnist", auth_token="t").to_json()
    {'model_name': 'mnist', 'auth_token': 't'}
    >>> parse_authenticate(AuthenticateRequest("mnist").to_json())
    AuthenticateRequest(model_name='mnist', model_version=None, auth_token=None)
    """

    model_name: str = field(metadata={"maxLength": 4096})
    model_version: str | None = None
    auth_token: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _present(
            {
                "model_name": self.model_name,
                "model_version": self.model_version,
                "auth_token": self.auth_token,
            }
        )


_NON_NEGATIVE = {"minimum": 0}


@dataclass(frozen=True)
class CycleRequest:
    """``model-centric/cycle-request``: a worker asks to join the open cycle.

    >>> CycleRequest("w1", "mnist", ping=3.0).to_json()
    {'worker_id': 'w1', 'model': 'mnist', 'ping': 3.0}
    """

    worker_id: str
    model: str
    version: str | None = None
    ping: float | None = field(default=None, metadata={**_NON_NEGATIVE, "description": "ms"})
    download: float | None = field(
        default=None, metadata={**_NON_NEGATIVE, "description": "Mbit/s"}
    )
    upload: float | None = field(default=None, metadata={**_NON_NEGATIVE, "description": "Mbit/s"})
    #: gridfl extension: seconds the node may hold a rejection until a cycle opens
    wait: float = field(
        default=0.0,
        metadata={
            **_NON_NEGATIVE,
            "maximum": MAX_WAIT,
            "description": "gridfl: hold a rejection up to this many seconds",
        },
    )
    #: gridfl extension: the protocols this worker runs (a process hosted with one is
    #: refused to workers that do not name it, such as syft.js)
    protocols: list[str] | None = field(
        default=None,
        metadata={
            "maxItems": MAX_WORKER_PROTOCOLS,
            "description": "gridfl: protocols this worker runs, e.g. secure_aggregation",
        },
    )
    #: gridfl extension: what else this worker can do; ``["evaluation"]`` lets the node
    #: place it in an evaluation cycle (syft.js sends none: it only ever trains)
    capabilities: list[str] | None = field(
        default=None,
        metadata={
            "maxItems": MAX_WORKER_PROTOCOLS,
            "description": "gridfl: e.g. ['evaluation'] to take evaluation cycles",
        },
    )

    def to_json(self) -> dict[str, Any]:
        return _present(
            {
                "worker_id": self.worker_id,
                "model": self.model,
                "version": self.version,
                "ping": self.ping,
                "download": self.download,
                "upload": self.upload,
                "wait": self.wait or None,  # 0 is the default: PyGrid is sent no extension
                "protocols": self.protocols or None,
                "capabilities": self.capabilities or None,
            }
        )


@dataclass(frozen=True)
class ReportRequest:
    """``model-centric/report``: a worker's diff for the cycle it was accepted into.

    >>> ReportRequest("w1", "k", b"diff", num_samples=10).to_json()
    {'worker_id': 'w1', 'request_key': 'k', 'diff': 'ZGlmZg==', 'num_samples': 10}
    >>> parse_report(ReportRequest("w1", "k", b"diff").to_json()).diff
    b'diff'
    """

    worker_id: str
    request_key: str
    diff: bytes | memoryview = field(repr=False, metadata={"description": "base64 State bytes"})
    num_samples: int | None = field(
        default=None, metadata={"minimum": 1, "maximum": MAX_NUM_SAMPLES}
    )
    metrics: dict[str, float] = field(default_factory=dict, metadata={"maxProperties": 32})
    #: gridfl extension, binary frames only: the encoding of ``diff`` (see
    #: :mod:`gridfl.compression`); None = plain State bytes
    compression: str | None = field(
        default=None,
        metadata={
            "enum": ["float16", "int8", "topk"],
            "description": "gridfl, binary frames on gridfl.binary.2 only: diff encoding",
        },
    )

    def to_json(self, *, raw_diff: bool = False) -> dict[str, Any]:
        """The report as JSON, its ``diff`` base64 text; ``raw_diff=True`` leaves the
        bytes for the transport (a binary WebSocket frame carries them raw)."""
        return _present(
            {
                "worker_id": self.worker_id,
                "request_key": self.request_key,
                "diff": self.diff if raw_diff else encode_diff(self.diff),
                "num_samples": self.num_samples,
                "metrics": self.metrics or None,
                "compression": self.compression,
            }
        )


@dataclass(frozen=True)
class AssetRequest:
    """Query of ``get-model`` / ``get-plan`` / ``get-protocol``; the id's name (``model_id``,
    ``plan_id``, ``protocol_id``) is the download's.

    >>> AssetRequest("w1", "k", 7).to_json("model_id")
    {'worker_id': 'w1', 'request_key': 'k', 'model_id': 7}
    """

    worker_id: str
    request_key: str
    asset_id: int
    receive_operations_as: str | None = None

    def to_json(self, id_key: str) -> dict[str, Any]:
        return _present(
            {
                "worker_id": self.worker_id,
                "request_key": self.request_key,
                id_key: self.asset_id,
                "receive_operations_as": self.receive_operations_as,
            }
        )


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
        protocols=_protocol_names(data),
        capabilities=_protocol_names(data, "capabilities"),
    )


def _protocol_names(data: dict[str, Any], key: str = "protocols") -> list[str] | None:
    value = data.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_WORKER_PROTOCOLS
        or not all(isinstance(v, str) and 0 < len(v) <= 64 for v in value)
    ):
        raise InvalidRequestError(
            f"'{key}' must be a list of at most {MAX_WORKER_PROTOCOLS} names "
            "(strings of 1 to 64 characters)"
        )
    return value


def _wait(data: dict[str, Any]) -> float:
    value = data.get("wait", 0)
    if value is None:
        return 0.0
    f = _finite(value)
    if f is None or not 0 <= f <= MAX_WAIT:
        raise InvalidRequestError(f"'wait' must be a number of seconds from 0 to {MAX_WAIT:g}")
    return f


def decode_diff(value: Any) -> bytes | memoryview:
    """Decode the report's ``diff``: standard base64 (padded) of State bytes, or the raw
    bytes a binary WebSocket report carried after its header (a view of the frame stays
    a view: it is read once)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise InvalidRequestError(
                "'diff' must not be empty: the binary frame has no bytes after its header"
            )
        return value if isinstance(value, memoryview) else bytes(value)
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


def b64encode(data: bytes | memoryview) -> str:
    """Bytes to standard base64 text (the encoding of diffs and hosted blobs)."""
    return pybase64.b64encode(data).decode("ascii")


def encode_diff(diff: bytes | memoryview) -> str:
    return b64encode(diff)


#: the stages a secure-aggregation message may name (gridfl.secagg.messages.STAGES)
SECAGG_STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")


@dataclass(frozen=True)
class SecAggRequest:
    """``model-centric/secure-aggregation`` (gridfl extension): a worker's message for one
    stage of secure aggregation in the cycle it was accepted into, or, with ``message``
    null, its request for what the node has for it at that stage.

    >>> parse_secagg(SecAggRequest("w1", "k", "unmask").to_json()).stage
    'unmask'
    """

    worker_id: str
    request_key: str
    stage: str = field(metadata={"enum": list(SECAGG_STAGES)})
    message: dict[str, Any] | None = field(
        default=None,
        metadata={"description": "the stage's message (gridfl.secagg.messages); null: poll"},
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "request_key": self.request_key,
            "stage": self.stage,
            "message": self.message,
        }


def parse_secagg(data: Any) -> SecAggRequest:
    data = _obj(data, "secure-aggregation")
    stage = data.get("stage")
    if stage not in SECAGG_STAGES:
        raise InvalidRequestError(f"'stage' must be one of {', '.join(SECAGG_STAGES)}")
    message = data.get("message")
    if message is not None and not isinstance(message, dict):
        raise InvalidRequestError("'message' must be an object or null")
    return SecAggRequest(_str(data, "worker_id"), _str(data, "request_key"), stage, message)


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
    clean = _metrics(data)
    compression = data.get("compression")
    if compression is not None:
        if compression not in ("float16", "int8", "topk"):
            raise InvalidRequestError(
                f"'compression' must be 'float16', 'int8' or 'topk', got {compression!r:.60}"
            )
        if isinstance(data.get("diff"), str):
            raise InvalidRequestError(
                "a compressed diff travels only in a binary report frame on a WebSocket "
                f"that negotiated {BINARY_SUBPROTOCOL!r}; send plain State bytes here"
            )
    return ReportRequest(worker_id, request_key, diff, num_samples, clean, compression)


def _metrics(data: dict[str, Any]) -> dict[str, float]:
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
    return clean


@dataclass(frozen=True)
class EvaluationReport:
    """``model-centric/evaluation-report`` (gridfl extension): the metrics a worker
    measured in an evaluation cycle, on ``num_samples`` held-out examples. No diff.

    >>> EvaluationReport("w1", "k", 50, {"accuracy": 0.9}).to_json()
    {'worker_id': 'w1', 'request_key': 'k', 'num_samples': 50, 'metrics': {'accuracy': 0.9}}
    >>> parse_evaluation_report(EvaluationReport("w1", "k", 50, {"loss": 1}).to_json())
    EvaluationReport(worker_id='w1', request_key='k', num_samples=50, metrics={'loss': 1.0})
    """

    worker_id: str
    request_key: str
    num_samples: int = field(metadata={"minimum": 1, "maximum": MAX_NUM_SAMPLES})
    metrics: dict[str, float] = field(metadata={"minProperties": 1, "maxProperties": 32})

    def to_json(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "request_key": self.request_key,
            "num_samples": self.num_samples,
            "metrics": self.metrics,
        }


def parse_evaluation_report(data: Any) -> EvaluationReport:
    data = _obj(data, "evaluation-report")
    num_samples = data.get("num_samples")
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or not 0 < num_samples <= MAX_NUM_SAMPLES
    ):
        raise InvalidRequestError(
            f"'num_samples' is required: a positive integer (at most {MAX_NUM_SAMPLES}), "
            "the number of held-out examples the metrics were measured on"
        )
    metrics = _metrics(data)
    if not metrics:
        raise InvalidRequestError("'metrics' is required: an object of at least one name -> number")
    return EvaluationReport(
        _str(data, "worker_id"), _str(data, "request_key"), num_samples, metrics
    )


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
# Each has ``to_json()`` (the node's reply) and a ``parse_*`` the worker reads replies with,
# as tolerant as syft.js: PyGrid and older gridfl nodes leave out ``status`` on success and
# may leave out the ids and config a worker can do without. ``STATUS`` is the ``status``
# value the node sends.
def _reply_field(data: dict[str, Any], key: str, call: str) -> Any:
    if data.get(key) is None:
        raise GridError(f"malformed reply to {call}: no {key!r} in {data!r:.300}")
    return data[key]


def _reply_obj(data: Any, call: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise GridError(f"malformed reply to {call}: expected a JSON object, got {data!r:.200}")
    return data


#: the node always sends this field; a worker reading PyGrid's reply does without it
_ALWAYS_SENT = {"always_sent": True}


@dataclass(frozen=True)
class AuthenticateResponse:
    """The node's reply to :class:`AuthenticateRequest`.

    >>> AuthenticateResponse("w1", requires_speed_test=True).to_json()
    {'status': 'success', 'worker_id': 'w1', 'requires_speed_test': True}
    >>> parse_authenticate_response({"worker_id": 7})  # PyGrid: no status, a number
    AuthenticateResponse(worker_id='7', requires_speed_test=False)
    """

    STATUS: ClassVar[str] = "success"
    worker_id: str
    requires_speed_test: bool = field(default=False, metadata=_ALWAYS_SENT)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.STATUS,
            "worker_id": self.worker_id,
            "requires_speed_test": bool(self.requires_speed_test),
        }


def parse_authenticate_response(data: Any) -> AuthenticateResponse:
    """The worker's reading of an authenticate reply: no ``status`` means success."""
    data = _reply_obj(data, AUTHENTICATE)
    if data.get("status", AuthenticateResponse.STATUS) != AuthenticateResponse.STATUS:
        raise GridError(f"authentication failed: {data!r:.300}")
    return AuthenticateResponse(
        worker_id=str(_reply_field(data, "worker_id", AUTHENTICATE)),
        requires_speed_test=bool(data.get("requires_speed_test", False)),
    )


@dataclass(frozen=True)
class CycleAccepted:
    """The node's reply to a :class:`CycleRequest` it accepted (PyGrid's, plus
    ``plan_digests``, a gridfl extension left out when empty: the SHA-256 (hex) of each
    plan's ``onnx`` variant, so a worker holding those bytes need not download them again).

    >>> reply = CycleAccepted("k", 1, model="mnist", version="1.0", plans={"training": 2})
    >>> reply.to_json()["plans"]
    {'training': 2}
    >>> parse_cycle_response(reply.to_json()) == reply
    True
    """

    STATUS: ClassVar[str] = "accepted"
    request_key: str
    #: ids are passed back to the node as they came (PyGrid's and gridfl's are integers)
    model_id: int
    model: str | None = field(default=None, metadata=_ALWAYS_SENT)
    version: str | None = field(default=None, metadata=_ALWAYS_SENT)
    plans: dict[str, int] = field(default_factory=dict, metadata=_ALWAYS_SENT)
    protocols: dict[str, int] = field(default_factory=dict, metadata=_ALWAYS_SENT)
    client_config: dict[str, Any] = field(default_factory=dict, metadata=_ALWAYS_SENT)
    plan_digests: dict[str, str] | None = field(
        default=None,
        metadata={
            "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "description": "gridfl: SHA-256 (hex) of each plan's onnx variant; a worker "
            "holding those bytes need not download the plan again",
        },
    )

    #: gridfl extension, left out when None: ``server_config.compression``, which a worker
    #: applies to its report on a socket that negotiated ``gridfl.binary.2``
    compression: dict[str, Any] | None = field(
        default=None,
        metadata={"description": "gridfl: the diff encoding the node asks for (binary only)"},
    )
    #: gridfl extension, left out for training: ``"evaluation"`` when the worker is to run
    #: the evaluation plan on the checkpoint and send an :class:`EvaluationReport`
    kind: str | None = field(
        default=None,
        metadata={"enum": [EVALUATION], "description": "gridfl: absent = a training cycle"},
    )

    def to_json(self) -> dict[str, Any]:
        out = {
            "status": self.STATUS,
            "request_key": self.request_key,
            "version": self.version,
            "model": self.model,
            "plans": self.plans,
            "protocols": self.protocols,
            "client_config": self.client_config,
            "model_id": self.model_id,
        }
        if self.plan_digests:
            out["plan_digests"] = self.plan_digests
        if self.compression:
            out["compression"] = self.compression
        if self.kind:
            out["kind"] = self.kind
        return out


@dataclass(frozen=True)
class CycleRejected:
    """The node's reply to a :class:`CycleRequest` it rejected: ``timeout`` is whole
    seconds until a retry may succeed, ``None`` when nothing is left to train.

    >>> CycleRejected(timeout=-3, reason="full").to_json()
    {'status': 'rejected', 'reason': 'full', 'timeout': 0}
    >>> parse_cycle_response({"status": "rejected", "timeout": "0:00:09.5"})
    CycleRejected(timeout=10, reason=None)
    """

    STATUS: ClassVar[str] = "rejected"
    timeout: int | None = field(
        default=None,
        metadata={
            "minimum": 0,
            "description": "seconds until a retry may succeed; absent: nothing left to train",
        },
    )
    reason: str | None = field(default=None, metadata=_ALWAYS_SENT)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.STATUS, "reason": self.reason}
        if self.timeout is not None:
            out["timeout"] = max(0, int(self.timeout))
        return out


def parse_cycle_response(data: Any) -> CycleAccepted | CycleRejected:
    """The worker's reading of a cycle-request reply (a :class:`CycleStatusError` if its
    ``status`` is neither accepted nor rejected)."""
    data = _reply_obj(data, CYCLE_REQUEST)
    status = data.get("status")
    if status == CycleRejected.STATUS:
        reason = data.get("reason")
        return CycleRejected(parse_timeout(data.get("timeout")), reason=_text_or_none(reason))
    if status != CycleAccepted.STATUS:
        raise CycleStatusError(f"unknown cycle status {status!r} in reply {data!r:.300}")
    plans = data.get("plans") or {}
    protocols = data.get("protocols") or {}
    client_config = data.get("client_config") or {}
    if not isinstance(plans, dict) or not isinstance(protocols, dict):
        raise GridError(f"malformed accepted reply: plans/protocols {data!r:.300}")
    if not isinstance(client_config, dict):
        raise GridError(f"malformed accepted reply: client_config {client_config!r:.200}")
    digests = data.get("plan_digests")
    return CycleAccepted(
        request_key=str(_reply_field(data, "request_key", CYCLE_REQUEST)),
        model_id=_reply_field(data, "model_id", CYCLE_REQUEST),
        model=_text_or_none(data.get("model")),
        version=data.get("version"),
        plans=plans,
        protocols=protocols,
        client_config=client_config,
        # an unknown or malformed digest just means the plan is downloaded
        plan_digests=digests if isinstance(digests, dict) else None,
        compression=_compression_or_none(data.get("compression")),
        # a kind this SDK does not know is not an evaluation: it trains as PyGrid's do
        kind=EVALUATION if data.get("kind") == EVALUATION else None,
    )


def _compression_or_none(value: Any) -> dict[str, Any] | None:
    """The node's ``compression`` request as the worker reads it: one it does not
    understand means a plain report."""
    from gridfl.compression import validate_config

    try:
        return validate_config(value)
    except GridflError:
        return None


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class ReportResponse:
    """The node's reply to a :class:`ReportRequest` it stored.

    >>> ReportResponse().to_json()
    {'status': 'success'}
    """

    STATUS: ClassVar[str] = "success"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.STATUS}


def parse_report_response(data: Any) -> ReportResponse:
    """The worker's reading of a report reply: no ``status`` means success."""
    data = _reply_obj(data, REPORT)
    if data.get("status", ReportResponse.STATUS) != ReportResponse.STATUS:
        raise GridError(f"report failed: {data!r:.300}")
    return ReportResponse()


_TIMEDELTA = re.compile(
    r"^\s*(?:(?P<days>-?\d+)\s+days?,\s*)?(?P<h>-?\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d*)?)\s*$"
)


def parse_timeout(value: Any) -> int | None:
    """A rejection ``timeout`` as whole seconds (rounded up, at least 0), or ``None``.

    gridfl sends integer seconds; PyGrid sends ``str(timedelta)`` such as
    ``"7:59:41.123456"``, ``"1 day, 2:00:00"`` or, after the deadline,
    ``"-1 day, 23:59:50"``. Anything unreadable is treated as "no timeout".

        >>> parse_timeout("1 day, 2:00:00"), parse_timeout(-5), parse_timeout("soon")
        (93600, 0, None)
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            seconds = float(text)
        except ValueError:
            m = _TIMEDELTA.match(text)
            if m is None:
                return None
            days = int(m["days"] or 0)
            seconds = days * 86400 + int(m["h"]) * 3600 + int(m["m"]) * 60 + float(m["s"])
    else:
        return None
    if not math.isfinite(seconds):
        return None
    return max(0, math.ceil(seconds))


# --- the dashboard ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DashboardSignIn:
    """``POST /dashboard/api/session``: sign in to the dashboard with the admin token
    (sent once in the body, never in a URL; the reply sets the session cookie).

    >>> parse_dashboard_sign_in({"token": "s3cret"})
    DashboardSignIn(token='s3cret')
    >>> parse_dashboard_sign_in({"token": 7})
    Traceback (most recent call last):
    gridfl._exceptions.InvalidRequestError: 'token' must be the node's admin token, a string
    """

    token: str = field(metadata={"minLength": 1, "maxLength": 4096})


def parse_dashboard_sign_in(data: Any) -> DashboardSignIn:
    data = _obj(data, "sign-in")
    token = data.get("token")
    if not isinstance(token, str) or not 0 < len(token) <= 4096:
        raise InvalidRequestError("'token' must be the node's admin token, a string")
    return DashboardSignIn(check_text(token, "'token'"))
