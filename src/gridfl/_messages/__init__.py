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

from gridfl._messages.fields import (
    MAX_MESSAGE_VALUES,
    MAX_NUM_SAMPLES,
    check_json_values,
    check_text,
    parse_json,
)
from gridfl._messages.frames import (
    BINARY_SUBPROTOCOL,
    MAX_BINARY_HEADER,
    binary_report_data,
    echoable_request_id,
    encode_binary_reply,
    encode_binary_report,
    error_body,
    parse_max_bytes,
    parse_ws_frame,
    select_subprotocol,
    split_binary_frame,
    split_binary_report,
    ws_error,
    ws_reply,
)
from gridfl._messages.names import (
    AUTHENTICATE,
    CYCLE_REQUEST,
    EVALUATION,
    EVALUATION_REPORT,
    GET_MODEL,
    GET_PLAN,
    GET_PROTOCOL,
    HOST_TRAINING,
    MSG_AUTH_INVALID,
    MSG_AUTH_REQUIRED,
    MSG_AUTH_THIRD_PARTY,
    MSG_INVALID_REQUEST_KEY,
    MSG_MODEL_NOT_FOUND,
    MSG_PLAN_NOT_FOUND,
    MSG_PROTOCOL_NOT_FOUND,
    MSG_WORKER_NOT_FOUND,
    PLAN_VARIANTS,
    REPORT,
    SECURE_AGGREGATION,
    SOCKET_PING,
    WS_TYPES,
)
from gridfl._messages.requests import (
    MAX_STATUS_CYCLES,
    MAX_WAIT,
    AssetRequest,
    AuthenticateRequest,
    CycleRequest,
    EvaluationReport,
    ReportRequest,
    SecAggRequest,
    b64decode,
    b64encode,
    decode_diff,
    encode_diff,
    parse_asset_request,
    parse_authenticate,
    parse_cycle_request,
    parse_evaluation_report,
    parse_report,
    parse_secagg,
)
from gridfl._messages.responses import (
    AuthenticateResponse,
    CycleAccepted,
    CycleRejected,
    DashboardSignIn,
    ReportResponse,
    parse_authenticate_response,
    parse_cycle_response,
    parse_dashboard_sign_in,
    parse_report_response,
    parse_timeout,
)

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
    "MAX_STATUS_CYCLES",
    "MAX_WAIT",
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
    "b64decode",
    "b64encode",
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
