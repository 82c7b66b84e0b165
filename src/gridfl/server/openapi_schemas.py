"""The components of the node's OpenAPI description (:mod:`gridfl.server.openapi`): the
worker messages' schemas, generated from their dataclasses in :mod:`gridfl._messages` so
that they cannot drift from what the node parses and sends, and the admin API's
hand-written ones."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from gridfl import _messages


def ref(name: str) -> dict[str, str]:
    """A JSON reference to the component schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of one field's type: str, int, float, bool, bytes (base64 text; also
    ``bytes | memoryview``, a view the node reads a binary frame's payload through),
    ``dict[str, X]``, ``list[X]``, and ``X | None`` (nullable)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if set(args) == {bytes, memoryview}:
            return _type_schema(bytes)
        (inner,) = [a for a in args if a is not type(None)]
        return {**_type_schema(inner), "nullable": True}
    if hint is bytes:
        return {"type": "string", "format": "byte"}
    if hint is dict or origin is dict:
        values = args[1] if args else Any
        return {"type": "object"} | (
            {} if values is Any else {"additionalProperties": _type_schema(values)}
        )
    if hint is list or origin is list:
        return {"type": "array"} | ({"items": _type_schema(args[0])} if args else {})
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    raise TypeError(f"no JSON schema for {hint!r}")


def message_schema(message: type) -> dict[str, Any]:
    """The JSON schema of a message dataclass: a property per field, typed by its
    annotation and constrained by its ``metadata`` (JSON-schema keywords such as
    ``minimum`` or ``description``; ``always_sent`` makes a field the node always sends
    required even though the worker's parser tolerates its absence); a response's
    ``STATUS`` becomes a required ``status`` property.

    >>> message_schema(_messages.ReportResponse)
    {'type': 'object', 'required': ['status'], 'properties': {'status': {'enum': ['success']}}}
    >>> message_schema(_messages.AuthenticateRequest)["properties"]["model_version"]
    {'type': 'string', 'nullable': True}
    """
    hints = typing.get_type_hints(message)
    required: list[str] = []
    properties: dict[str, Any] = {}
    if hasattr(message, "STATUS"):
        required.append("status")
        properties["status"] = {"enum": [message.STATUS]}
    for f in dataclasses.fields(message):
        constraints = dict(f.metadata)
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if constraints.pop("always_sent", False) or no_default:
            required.append(f.name)
        properties[f.name] = {**_type_schema(hints[f.name]), **constraints}
    return {"type": "object", "required": required, "properties": properties}


_MESSAGES = (
    _messages.AuthenticateRequest,
    _messages.AuthenticateResponse,
    _messages.CycleRequest,
    _messages.CycleAccepted,
    _messages.CycleRejected,
    _messages.ReportRequest,
    _messages.ReportResponse,
    _messages.SecAggRequest,
    _messages.EvaluationReport,
)

SCHEMAS: dict[str, Any] = {
    **{message.__name__: message_schema(message) for message in _MESSAGES},
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "RejectedError": {
        "type": "object",
        "required": ["error", "status"],
        "properties": {"error": {"type": "string"}, "status": {"enum": ["rejected"]}},
    },
    "Empty": {"type": "object"},
    "Health": {
        "type": "object",
        "required": ["status", "version", "database"],
        "properties": {
            "status": {"enum": ["ok"]},
            "version": {"type": "string"},
            "database": {"type": "string"},
        },
    },
    "HostRequest": {
        "type": "object",
        "required": ["client_config", "model", "plans"],
        "additionalProperties": False,
        "properties": {
            "client_config": {
                "type": "object",
                "required": ["name", "version"],
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 255},
                    "version": {"type": "string", "minLength": 1, "maxLength": 255},
                },
            },
            "server_config": {
                "type": "object",
                "nullable": True,
                "description": "keys and defaults in docs/configs.md; unknown keys are refused",
            },
            "model": {"type": "string", "format": "byte"},
            "plans": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {
                    "oneOf": [
                        {"type": "string", "format": "byte"},
                        {
                            "type": "object",
                            "additionalProperties": {"type": "string", "format": "byte"},
                        },
                    ]
                },
            },
            "averaging_plan": {"type": "string", "format": "byte", "nullable": True},
            "protocols": {
                "type": "object",
                "nullable": True,
                "additionalProperties": {"type": "string", "format": "byte"},
            },
        },
    },
    "HostResponse": {
        "type": "object",
        "required": ["status", "id", "model_id", "name", "version", "plans", "protocols", "cycle"],
        "properties": {
            "status": {"enum": ["success"]},
            "id": {"type": "integer"},
            "model_id": {"type": "integer"},
            "name": {"type": "string"},
            "version": {"type": "string"},
            "plans": {"type": "object", "additionalProperties": {"type": "integer"}},
            "protocols": {"type": "object", "additionalProperties": {"type": "integer"}},
            "cycle": {"type": "integer"},
        },
    },
    "ProcessSummary": {
        "type": "object",
        "required": ["id", "name", "version", "status", "current_cycle", "latest_checkpoint"],
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "version": {"type": "string"},
            "status": {"enum": ["running", "finished", "stopped"]},
            "created_at": {"type": "number"},
            "current_cycle": {"type": "integer", "nullable": True},
            "latest_checkpoint": {"type": "integer", "nullable": True},
        },
    },
    "ProcessList": {
        "type": "object",
        "required": ["processes"],
        "properties": {"processes": {"type": "array", "items": ref("ProcessSummary")}},
    },
    "ProcessStatus": {
        "allOf": [
            ref("ProcessSummary"),
            {
                "type": "object",
                "required": ["server_config", "client_config", "cycles", "checkpoints"],
                "properties": {
                    "server_config": {"type": "object"},
                    "client_config": {"type": "object"},
                    "current": {"type": "object", "nullable": True},
                    "strategy": {
                        "type": "object",
                        "description": "name, params and state summary (docs/configs.md)",
                    },
                    "cycles": {"type": "array", "items": {"type": "object"}},
                    "privacy": {
                        "type": "object",
                        "description": "differential privacy: epsilon spent, the budget, the "
                        "clip norm (docs/privacy.md); only for a process hosted with it",
                    },
                    "checkpoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["number"],
                            "properties": {
                                "number": {"type": "integer"},
                                "alias": {"type": "string", "nullable": True},
                                "created_at": {"type": "number"},
                            },
                        },
                    },
                },
            },
        ]
    },
    "ProcessAction": {
        "type": "object",
        "required": ["status", "name", "version"],
        "properties": {
            "status": {"enum": ["success"]},
            "name": {"type": "string"},
            "version": {"type": "string"},
        },
    },
}
