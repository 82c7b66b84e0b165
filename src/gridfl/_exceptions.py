"""
The one error hierarchy of gridfl.

Every error gridfl raises on purpose derives from :class:`GridflError`. Errors about bad
values also derive from :class:`ValueError`, so ``except ValueError`` keeps working.

* GridflError
  + StateError               not a valid syft-proto ``State``, or unsupported tensors
  + ModelError               params do not match the model (count, shape, dtype)
  + PlanError
    - PlanLoadError          bytes are not a loadable gridfl ONNX plan
    - PlanInputError         ``Plan.execute`` got the wrong number, shape or dtype of inputs
  + CompileError             a torch function or module cannot be compiled into a plan
  + ConfigError              an invalid ``client_config``, ``server_config`` or setting
  + ProtocolError            a secure-aggregation message is malformed or must be refused
  + AggregationAbortedError  too few workers survived a secure-aggregation cycle
  + GridError                an FL request failed (raised by the node, re-raised by workers)
    - InvalidRequestError    malformed or invalid input (HTTP 400)
      · PayloadTooLargeError the body is larger than the node accepts (HTTP 413)
      · RequestTimeoutError  the body stopped arriving (HTTP 408)
    - AuthenticationError    missing, invalid or foreign credentials (HTTP 400/401)
    - PermissionDeniedError  authenticated, but not allowed to do this (HTTP 403)
    - NotFoundError          unknown process, model, plan, cycle or worker (HTTP 404)
    - ConflictError          already exists / already done (HTTP 409)
    - UnavailableError       the node cannot serve now, retry later (HTTP 503)
    - ModelLoadFailedError   a worker could not download or decode the model
    - PlanLoadFailedError    a worker could not download or load a plan
    - CycleStatusError       the node answered a cycle request with an unknown status
    - TransportError         the network failed (connect, read, timeout); retryable
      · ResponseTimeoutError no reply within the request timeout
"""

from __future__ import annotations

__all__ = [
    "AggregationAbortedError",
    "AuthenticationError",
    "CompileError",
    "ConfigError",
    "ConflictError",
    "CycleStatusError",
    "GridError",
    "GridflError",
    "InvalidRequestError",
    "ModelError",
    "ModelLoadFailedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PlanError",
    "PlanInputError",
    "PlanLoadError",
    "PlanLoadFailedError",
    "ProtocolError",
    "RequestTimeoutError",
    "ResponseTimeoutError",
    "StateError",
    "TransportError",
    "UnavailableError",
    "error_for_status",
]


class GridflError(Exception):
    """Base class of every error gridfl raises on purpose."""


class StateError(GridflError, ValueError):
    """The bytes are not a valid syft-proto ``State``, or hold a tensor gridfl cannot decode."""


class ModelError(GridflError, ValueError):
    """Parameters do not match the model: wrong count, shape or dtype."""


class PlanError(GridflError):
    """Base class of plan errors."""


class PlanLoadError(PlanError, ValueError):
    """The bytes are not a loadable gridfl ONNX plan (or its metadata is invalid)."""


class PlanInputError(PlanError, ValueError):
    """``Plan.execute`` got the wrong number, shape or dtype of inputs."""


class CompileError(GridflError):
    """A torch function or module cannot be compiled into an ONNX plan."""


class ConfigError(GridflError, ValueError):
    """An invalid ``client_config``, ``server_config``, setting or option."""


class ProtocolError(GridflError, ValueError):
    """A secure-aggregation message is malformed, replayed, or asks for what an honest
    worker must not give (both secrets of one worker); the receiver refuses it."""


class AggregationAbortedError(GridflError):
    """A secure-aggregation cycle cannot be unmasked: fewer workers survived than the
    threshold or ``min_survivors``. Nothing is aggregated and nothing is revealed."""


class GridError(GridflError):
    """An FL request failed.

    The grid node raises the subclasses below from its handlers; one table in
    ``gridfl.server`` maps them to HTTP status codes and WebSocket error replies.
    Workers raise the same classes from the node's replies.
    """

    #: HTTP status the node answers with for this error.
    http_status: int = 500
    #: True when retrying the same request later may succeed.
    retryable: bool = False


class InvalidRequestError(GridError, ValueError):
    """Malformed or invalid input: wrong JSON, types, fields, or bytes."""

    http_status = 400


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the node accepts."""

    http_status = 413


class RequestTimeoutError(InvalidRequestError):
    """The request body stopped arriving for longer than the node waits (a stalled upload)."""

    http_status = 408


class AuthenticationError(GridError):
    """Missing, invalid or foreign credentials (JWT, admin token, worker id, request key)."""

    http_status = 401


class PermissionDeniedError(GridError):
    """The caller is known but not allowed to do this."""

    http_status = 403


class NotFoundError(GridError):
    """Unknown process, model, plan, protocol, cycle, checkpoint or worker."""

    http_status = 404


class ConflictError(GridError):
    """The thing already exists or was already done (same process twice, double report)."""

    http_status = 409


class UnavailableError(GridError):
    """The node cannot serve the request now (database down, shutting down); retry later."""

    http_status = 503
    retryable = True


class ModelLoadFailedError(GridError):
    """A worker could not download or decode the model."""


class PlanLoadFailedError(GridError):
    """A worker could not download or load a plan."""


class CycleStatusError(GridError):
    """The node answered a cycle request with a status other than accepted or rejected."""


class TransportError(GridError):
    """The network failed: connection refused or dropped, read error, timeout."""

    retryable = True


class ResponseTimeoutError(TransportError):
    """No reply arrived within the request timeout."""


def error_for_status(status: int | None) -> type[GridError]:
    """The :class:`GridError` subclass the node answers with ``status`` (the class whose
    own ``http_status`` it is), or :class:`GridError` for any other status.

        >>> error_for_status(409).__name__
        'ConflictError'
    """
    return _BY_STATUS.get(status, GridError) if status is not None else GridError


def _own_statuses(cls: type[GridError]) -> dict[int, type[GridError]]:
    found: dict[int, type[GridError]] = {}
    for sub in cls.__subclasses__():
        if "http_status" in vars(sub):
            found.setdefault(sub.http_status, sub)
        found.update({k: v for k, v in _own_statuses(sub).items() if k not in found})
    return found


#: status -> class, derived from the classes: one table for the node and both clients
_BY_STATUS = _own_statuses(GridError)
