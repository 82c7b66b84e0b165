"""Requests: what workers send, and the node's strict parsers of them."""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Any

import pybase64

from gridfl._exceptions import InvalidRequestError
from gridfl._messages.fields import MAX_NUM_SAMPLES, _finite, _number, _obj, _str, check_text
from gridfl._messages.frames import BINARY_SUBPROTOCOL
from gridfl._messages.names import PLAN_VARIANTS

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


def b64decode(value: str | bytes | bytearray | memoryview) -> bytes:
    """Strict standard base64 (padded, no stray characters) to bytes.

    pybase64 (SIMD) rather than the standard library: a CNN diff is 9 MB of base64,
    which the standard library decodes in ~50 ms and pybase64 in ~1 ms.
    """
    return pybase64.b64decode(value, validate=True)


def b64encode(data: bytes | bytearray | memoryview) -> str:
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
    wait_for_next: bool = field(
        default=False,
        metadata={
            "description": "with an advertise_keys or share_keys message: hold the reply "
            "until the next stage opens (up to a few seconds) and bring the node's message "
            "for it as 'next'"
        },
    )

    def to_json(self) -> dict[str, Any]:
        out = {
            "worker_id": self.worker_id,
            "request_key": self.request_key,
            "stage": self.stage,
            "message": self.message,
        }
        return {**out, "wait_for_next": True} if self.wait_for_next else out


def parse_secagg(data: Any) -> SecAggRequest:
    data = _obj(data, "secure-aggregation")
    stage = data.get("stage")
    if stage not in SECAGG_STAGES:
        raise InvalidRequestError(f"'stage' must be one of {', '.join(SECAGG_STAGES)}")
    message = data.get("message")
    if message is not None and not isinstance(message, dict):
        raise InvalidRequestError("'message' must be an object or null")
    wait_for_next = data.get("wait_for_next", False)
    if not isinstance(wait_for_next, bool):
        raise InvalidRequestError("'wait_for_next' must be true or false")
    return SecAggRequest(
        _str(data, "worker_id"), _str(data, "request_key"), stage, message, wait_for_next
    )


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
