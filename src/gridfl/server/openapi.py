"""The OpenAPI 3.0 description of the node's HTTP API, served at ``GET /openapi.json``.

Written as data (no framework introspection): the worker API under ``/model-centric/``, the
admin API under ``/gridfl/v1/`` and ``/health``. The worker messages' schemas are generated
from their dataclasses in :mod:`gridfl._messages`
(:func:`~gridfl.server.openapi_schemas.message_schema`), so the description
cannot drift from what the node parses and sends; the rest is written by hand.
docs/protocol.md is the prose contract; tests/server/test_openapi.py fuzzes a live node
against this description (schemathesis).
The WebSocket at ``/`` carries the same worker messages (not describable in OpenAPI).
"""

from __future__ import annotations

from typing import Any

import gridfl
from gridfl import _messages
from gridfl.server.config import MAX_INT
from gridfl.server.openapi_schemas import SCHEMAS
from gridfl.server.openapi_schemas import ref as _ref

_JSON = "application/json"
_OCTETS = "application/octet-stream"


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _errors(*codes: int, rejected: bool = False) -> dict[str, Any]:
    text = {
        400: "Invalid input (the message names the field or the problem)",
        401: "Missing or invalid credentials (admin token, request key)",
        403: "Not allowed (admin API disabled; a worker_id of another process)",
        404: "Unknown process, version or checkpoint",
        409: "Conflict (process exists; duplicate or late report)",
        413: "The body is larger than the node accepts",
        503: "The database is unavailable; retry later",
    }
    schema = _ref("RejectedError" if rejected else "Error")
    return {str(c): _json(schema, text[c]) for c in (*codes, 503)}


def _query(name: str, schema: dict[str, Any], required: bool = True, desc: str = "") -> dict:
    p = {"name": name, "in": "query", "required": required, "schema": schema}
    if desc:
        p["description"] = desc
    return p


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_STR = {"type": "string", "minLength": 1}
_ID = {"type": "string", "pattern": "^[0-9]+$", "description": "integer id"}
_ADMIN: list[dict[str, list[str]]] = [{"admin": []}]
_PV = [_path("name"), _path("version")]


def _asset(summary: str, id_key: str, extra: list | None = None) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "tags": ["worker"],
            "parameters": [
                _query("worker_id", _STR),
                _query("request_key", _STR),
                _query(id_key, _ID),
                *(extra or []),
            ],
            "responses": {
                "200": {
                    "description": "the bytes",
                    "content": {_OCTETS: {"schema": {"type": "string", "format": "binary"}}},
                },
                **_errors(400, 401),
            },
        }
    }


def _post(summary: str, request: str, ok: dict, *errors: int, rejected=False) -> dict:
    return {
        "post": {
            "summary": summary,
            "tags": ["worker"],
            "requestBody": {"required": True, "content": {_JSON: {"schema": _ref(request)}}},
            "responses": {"200": ok, **_errors(*errors, rejected=rejected)},
        }
    }


def _admin_get(summary: str, ok: dict, params: list, *errors: int) -> dict:
    return {
        "summary": summary,
        "tags": ["admin"],
        "security": _ADMIN,
        "parameters": params,
        "responses": {"200": ok, **_errors(401, 403, *errors)},
    }


_STATUS = _json(_ref("ProcessStatus"), "process status")
_STATUS_QUERY = [
    _query(
        "cycles",
        {"type": "integer", "minimum": 1, "maximum": _messages.MAX_STATUS_CYCLES, "default": 100},
        required=False,
        desc="how many of the latest cycles and checkpoints to list",
    ),
    _query(
        "wait",
        {"type": "number", "minimum": 0, "maximum": _messages.MAX_WAIT, "default": 0},
        required=False,
        desc="hold the reply up to this many seconds, until a cycle newer than `after` "
        "closes or the process stops running",
    ),
    _query(
        "after",
        {"type": "integer", "minimum": 0, "maximum": MAX_INT},
        required=False,
        desc="with `wait`: the newest cycle sequence already seen (default: the newest "
        "closed cycle when the request arrives)",
    ),
]
_ACTION = _json(_ref("ProcessAction"), "done")
_STATE_BYTES = {
    "description": "syft-proto State bytes",
    "content": {_OCTETS: {"schema": {"type": "string", "format": "binary"}}},
}
_HEALTH = {
    "get": {
        "summary": "liveness (no token)",
        "tags": ["admin"],
        "responses": {"200": _json(_ref("Health"), "the node is up"), **_errors()},
    }
}

PATHS: dict[str, Any] = {
    "/model-centric/authenticate": _post(
        "authenticate a worker for a process",
        "AuthenticateRequest",
        _json(_ref("AuthenticateResponse"), "a worker_id bound to the process"),
        400,
        404,
        413,
    ),
    "/model-centric/cycle-request": _post(
        "ask to join the open cycle",
        "CycleRequest",
        _json({"oneOf": [_ref("CycleAccepted"), _ref("CycleRejected")]}, "accepted or rejected"),
        400,
        403,
        413,
        rejected=True,
    ),
    "/model-centric/report": _post(
        "report a diff",
        "ReportRequest",
        _json(_ref("ReportResponse"), "stored and folded into the cycle's aggregate"),
        400,
        401,
        409,
        413,
    ),
    "/model-centric/evaluation-report": _post(
        "report the metrics of an evaluation cycle (no diff)",
        "EvaluationReport",
        _json(_ref("ReportResponse"), "stored"),
        400,
        401,
        409,
        413,
    ),
    "/model-centric/secure-aggregation": _post("one stage of secure aggregation, or a poll",
        "SecAggRequest", _json({"type": "object"}, "the node's reply"), 400, 401, 409, 413),
    "/model-centric/get-model": _asset("download the cycle's model (State bytes)", "model_id"),
    "/model-centric/get-plan": _asset(
        "download a plan variant",
        "plan_id",
        [_query("receive_operations_as", {"enum": list(_messages.PLAN_VARIANTS)}, required=False)],
    ),
    "/model-centric/get-protocol": _asset("download a protocol", "protocol_id"),
    "/model-centric/speed-test": {
        "get": {
            "summary": "speed-test download (multipart), or ping with is_ping",
            "tags": ["worker"],
            "parameters": [
                _query("worker_id", _STR),
                _query("random", {"type": "string"}, required=False),
                _query("is_ping", {"type": "string"}, required=False),
            ],
            "responses": {
                "200": {
                    "description": "multipart body (field 'sample'); {} for a ping",
                    "content": {
                        "multipart/form-data": {"schema": {"type": "string", "format": "binary"}},
                        _JSON: {"schema": _ref("Empty")},
                    },
                },
                **_errors(400),
            },
        },
        "post": {
            "summary": "speed-test upload (the body is read and dropped)",
            "tags": ["worker"],
            "parameters": [
                _query("worker_id", _STR),
                _query("random", {"type": "string"}, required=False),
            ],
            "requestBody": {
                "required": False,
                "content": {_OCTETS: {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": {"200": _json(_ref("Empty"), "{}"), **_errors(400)},
        },
    },
    "/model-centric/retrieve-model": {
        "get": _admin_get(
            "PyGrid's checkpoint download (admin token required)",
            _STATE_BYTES,
            [
                _query("name", {"type": "string"}),
                _query("version", {"type": "string"}, required=False),
                _query("checkpoint", {"type": "string"}, required=False, desc="number or alias"),
            ],
            400,
            404,
        )
    },
    "/health": _HEALTH,
    "/gridfl/v1/health": _HEALTH,
    "/gridfl/v1/processes": {
        "post": {
            "summary": "host an FL process (atomic)",
            "tags": ["admin"],
            "security": _ADMIN,
            "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("HostRequest")}}},
            "responses": {
                "201": _json(_ref("HostResponse"), "hosted; cycle 1 is open"),
                **_errors(400, 401, 403, 409, 413),
            },
        },
        "get": _admin_get("list processes", _json(_ref("ProcessList"), "processes"), []),
    },
    "/gridfl/v1/processes/{name}": {
        "get": _admin_get(
            "status of the latest version", _STATUS, [_path("name"), *_STATUS_QUERY], 400, 404
        )
    },
    "/gridfl/v1/processes/{name}/{version}": {
        "get": _admin_get("status", _STATUS, [*_PV, *_STATUS_QUERY], 400, 404),
        "delete": _admin_get("delete the process and all it stored", _ACTION, _PV, 400, 404),
    },
    "/gridfl/v1/processes/{name}/{version}/stop": {
        "post": _admin_get("stop: close the open cycle, open no more", _ACTION, _PV, 400, 404)
    },
    "/gridfl/v1/processes/{name}/{version}/checkpoints/{ref}": {
        "get": _admin_get(
            "a checkpoint's State bytes (ref: number or alias such as latest)",
            _STATE_BYTES,
            [*_PV, _path("ref")],
            400,
            404,
        )
    },
    "/openapi.json": {
        "get": {
            "summary": "this description",
            "tags": ["admin"],
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0 document")},
        }
    },
}


def spec() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict)."""
    import copy

    from gridfl.server.dashboard_openapi import extend

    return extend(copy.deepcopy(
        {
            "openapi": "3.0.3",
            "info": {
                "title": "gridfl grid node",
                "version": gridfl.__version__,
                "description": (
                    "PyGrid-compatible model-centric FL node. Worker API under /model-centric/ "
                    "(also over the WebSocket at /), admin API under /gridfl/v1/. Errors are "
                    'JSON {"error": "..."}. See docs/protocol.md.'
                ),
            },
            "paths": PATHS,
            "components": {
                "schemas": SCHEMAS,
                "securitySchemes": {
                    "admin": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "the node's admin token",
                    }
                },
            },
        }
    ))
