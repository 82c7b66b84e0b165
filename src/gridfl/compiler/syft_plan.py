"""Encode a syft-proto ``Plan`` in the tfjs form syft.js 0.1.4 executes.

syft.js runs ``Plan.role``: its ``placeholders``, then each ``ComputationAction`` in
order, calling ``tf[command.split('.').pop()](*args, *kwargs.values())`` and storing the
result under the action's first return placeholder id. Only what that executor reads is
written (field numbers from syft-proto 0.5, the schema syft.js 0.1.4 ships with).

    >>> a = Action("tf.add", (Ref(1), 2.0), 3)
    >>> data = encode_plan("training_plan", [a], inputs=[1], outputs=[3])
    >>> data[:4].hex()                    # field 1: the plan's Id {id_int: 1}
    '0a020801'
    >>> data.endswith(b"J\x04tfjs")       # field 9: base_framework
    True
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from gridfl._protobuf import key, len_field, varint_field

__all__ = ["Action", "ArgValue", "Ref", "encode_plan"]

_FIXED32 = 5


@dataclass(frozen=True)
class Ref:
    """A placeholder id: a plan input or the result of an earlier action."""

    id: int


ArgValue = Ref | bool | int | float | str | list["ArgValue"]


@dataclass(frozen=True)
class Action:
    """One tfjs call: ``command`` (``"tf.matMul"``), its positional args, its result id."""

    command: str
    args: tuple[ArgValue, ...]
    result: int


def _id(n: int) -> bytes:  # syft_proto.types.syft.v1.Id {id_int = 1}
    return varint_field(1, n)


def _placeholder_id(n: int) -> bytes:  # execution.v1.PlaceholderId {id = 1}
    return len_field(1, _id(n))


def _arg(value: ArgValue) -> bytes:
    """syft_proto.types.syft.v1.Arg: bool 1, int 2, float 3, str 4, placeholder_id 10,
    list 11."""
    if isinstance(value, Ref):
        return len_field(10, _placeholder_id(value.id))
    if isinstance(value, bool):
        return varint_field(1, int(value))
    if isinstance(value, int):
        return varint_field(2, value)
    if isinstance(value, float):
        return key(3, _FIXED32) + struct.pack("<f", value)
    if isinstance(value, str):
        return len_field(4, value.encode())
    if isinstance(value, list):  # ArgList {args = 1}
        return len_field(11, b"".join(len_field(1, _arg(v)) for v in value))
    raise TypeError(f"cannot encode a plan arg of type {type(value).__name__}")


def _action(a: Action) -> bytes:
    """ComputationAction: command 1, args 5, return_placeholder_ids 8."""
    body = len_field(1, a.command.encode())
    body += b"".join(len_field(5, _arg(v)) for v in a.args)
    return body + len_field(8, _placeholder_id(a.result))


def _placeholder(n: int) -> bytes:  # execution.v1.Placeholder {id = 3}
    return len_field(3, _id(n))


def encode_plan(
    name: str, actions: Sequence[Action], *, inputs: Sequence[int], outputs: Sequence[int],
    plan_id: int = 1, role_id: int = 2,
) -> bytes:
    """The serialized ``syft_proto.execution.v1.Plan`` (``base_framework`` ``"tfjs"``)."""
    ids = dict.fromkeys([*inputs, *(a.result for a in actions), *outputs])
    role = len_field(1, _id(role_id))
    role += b"".join(len_field(2, _action(a)) for a in actions)
    role += len_field(3, b"")  # an empty State: the plan carries no tensors of its own
    role += b"".join(len_field(4, _placeholder(i)) for i in ids)
    role += b"".join(len_field(5, _id(i)) for i in inputs)
    role += b"".join(len_field(6, _id(i)) for i in outputs)
    plan = len_field(1, _id(plan_id)) + len_field(2, role) + len_field(4, name.encode())
    return plan + len_field(9, b"tfjs")
