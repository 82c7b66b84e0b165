"""The OpenAPI description of the dashboard's JSON API (``/dashboard/api/``), added to
the node's document (:func:`gridfl.server.openapi.spec`) by :func:`extend`. Its requests
carry the session cookie that ``POST /dashboard/api/session`` sets, not the bearer token."""

from __future__ import annotations

from typing import Any

from gridfl import _messages
from gridfl.server.config import MAX_INT
from gridfl.server.openapi import (
    _JSON,
    _OCTETS,
    _PV,
    _STATUS_QUERY,
    _errors,
    _json,
    _path,
    _query,
    _ref,
)
from gridfl.server.openapi_schemas import message_schema

_SESSION: list[dict[str, list[str]]] = [{"dashboard_session": []}]
_NULLABLE_NUMBER = {"type": "number", "nullable": True}
_WAIT = _STATUS_QUERY[1]


def _op(summary: str, ok: dict, params: list, *errors: int, **extra: Any) -> dict[str, Any]:
    return {
        "summary": summary,
        "tags": ["dashboard"],
        "security": _SESSION,
        "parameters": params,
        "responses": {"200": ok, **_errors(401, *errors)},
        **extra,
    }


SCHEMAS: dict[str, Any] = {
    "DashboardSignIn": message_schema(_messages.DashboardSignIn),
    "DashboardSession": {
        "type": "object",
        "required": ["signed_in"],
        "properties": {"signed_in": {"type": "boolean"}, "expires_at": {"type": "integer"}},
    },
    "DashboardProcessList": {
        "type": "object",
        "required": ["processes", "generation"],
        "properties": {
            "generation": {
                "type": "integer",
                "description": "the node's count of cycle changes: send it back as `after`",
            },
            "processes": {
                "type": "array",
                "items": {
                    "allOf": [
                        _ref("ProcessSummary"),
                        {
                            "type": "object",
                            "required": ["reports", "strategy", "last_activity"],
                            "properties": {
                                "reports": {"type": "integer"},
                                "strategy": {"type": "string"},
                                "epsilon": _NULLABLE_NUMBER,
                                "last_activity": {"type": "number"},
                            },
                        },
                    ]
                },
            }
        },
    },
    "DashboardProcess": {
        "allOf": [
            _ref("ProcessStatus"),
            {
                "type": "object",
                "required": ["workers"],
                "properties": {
                    "workers": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["worker_id", "created_at"],
                            "properties": {
                                "worker_id": {"type": "string"},
                                "created_at": {"type": "number"},
                                "ping": {**_NULLABLE_NUMBER, "description": "ms"},
                                "download": {**_NULLABLE_NUMBER, "description": "Mbit/s"},
                                "upload": {**_NULLABLE_NUMBER, "description": "Mbit/s"},
                            },
                        },
                    }
                },
            },
        ]
    },
    "DashboardNode": {
        "type": "object",
        "required": ["version", "python", "pid", "database", "memory"],
        "properties": {
            "version": {"type": "string"},
            "python": {"type": "string"},
            "pid": {"type": "integer"},
            "database": {
                "type": "object",
                "required": ["kind", "healthy"],
                "properties": {
                    "kind": {"type": "string"},
                    "healthy": {"type": "boolean"},
                    "latency_ms": _NULLABLE_NUMBER,
                    "error": {"type": "string", "nullable": True},
                    "server_processes": {
                        "type": "array",
                        "nullable": True,
                        "description": "PostgreSQL: the server processes listening on it",
                        "items": {"type": "object"},
                    },
                },
            },
            "memory": {
                "type": "object",
                "properties": {"rss_mb": _NULLABLE_NUMBER, "peak_rss_mb": _NULLABLE_NUMBER},
            },
        },
    },
}

_SESSION_JSON = _json(_ref("DashboardSession"), "signed in or out")
_ORIGIN = "403: not from this node's page (the Origin header must name this node)"

PATHS: dict[str, Any] = {
    "/dashboard/api/session": {
        "post": {
            "summary": "sign in with the admin token; sets the session cookie",
            "description": _ORIGIN,
            "tags": ["dashboard"],
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": _ref("DashboardSignIn")}},
            },
            "responses": {"200": _SESSION_JSON, **_errors(400, 401, 403, 413)},
        },
        "delete": {
            "summary": "sign out: clears the session cookie",
            "description": _ORIGIN,
            "tags": ["dashboard"],
            "responses": {"200": _SESSION_JSON, **_errors(403)},
        },
        "get": _op("the session's expiry", _SESSION_JSON, []),
    },
    "/dashboard/api/node": {
        "get": _op("the node: version, database and its health, memory",
                   _json(_ref("DashboardNode"), "the node"), [])
    },
    "/dashboard/api/processes": {
        "get": _op(
            "every process with its list figures; `wait` holds the reply until a cycle "
            "opens or closes on the node",
            _json(_ref("DashboardProcessList"), "processes"),
            [
                _WAIT,
                _query("after", {"type": "integer", "minimum": 0, "maximum": MAX_INT},
                       required=False, desc="with `wait`: the `generation` of the last reply"),
            ],
            400,
        )
    },
    "/dashboard/api/processes/{name}/{version}": {
        "get": _op(
            "the process's status (configs masked) and the workers seen",
            _json(_ref("DashboardProcess"), "the process"),
            [*_PV, *_STATUS_QUERY],
            400,
            404,
        ),
        "delete": _op("delete the process", _json(_ref("ProcessAction"), "deleted"), _PV,
                      400, 403, 404, description=_ORIGIN),
    },
    "/dashboard/api/processes/{name}/{version}/stop": {
        "post": _op("stop the process", _json(_ref("ProcessAction"), "stopped"), _PV,
                    400, 403, 404, description=_ORIGIN)
    },
    "/dashboard/api/processes/{name}/{version}/checkpoints/{ref}": {
        "get": _op(
            "a checkpoint as a download: State bytes, or .npz (param_0, param_1, ...)",
            {
                "description": "the checkpoint (Content-Disposition: attachment)",
                "content": {_OCTETS: {"schema": {"type": "string", "format": "binary"}}},
            },
            [*_PV, _path("ref"),
             _query("format", {"enum": ["state", "npz"], "default": "state"}, required=False)],
            400,
            404,
        )
    },
}

SECURITY_SCHEMES: dict[str, Any] = {
    "dashboard_session": {
        "type": "apiKey",
        "in": "cookie",
        "name": "gridfl_session",
        "description": "the dashboard's session (POST /dashboard/api/session sets it)",
    }
}


def extend(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (the node's OpenAPI document) with the dashboard's paths and schemas added."""
    import copy

    doc["paths"].update(copy.deepcopy(PATHS))
    doc["components"]["schemas"].update(copy.deepcopy(SCHEMAS))
    doc["components"]["securitySchemes"].update(copy.deepcopy(SECURITY_SCHEMES))
    return doc
