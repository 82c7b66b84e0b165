"""Responses: what the node replies and the worker's tolerant parsers of them, and the
dashboard's sign-in."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gridfl._exceptions import CycleStatusError, GridError, GridflError, InvalidRequestError
from gridfl._messages.fields import _obj, check_text
from gridfl._messages.names import AUTHENTICATE, CYCLE_REQUEST, EVALUATION, REPORT


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
