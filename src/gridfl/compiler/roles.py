"""What each input and output of a plan is: role specs parsed, defaults for each kind of
plan, and the slot names the ONNX graph gets."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from gridfl._exceptions import CompileError
from gridfl.plan import INDEXED_ROLES, KEYED_ROLES

__all__ = [
    "RoleSpec", "default_input_roles", "default_output_roles", "meta_entry", "name_slots",
    "parse_roles",
]

RoleSpec = str | dict


def parse_roles(specs: Sequence[RoleSpec], allowed, what: str) -> list[dict]:
    """``["data", "client_config:lr", {"role": "model_param", "index": 0}]`` -> dicts."""
    out: list[dict] = []
    counters: dict[str, int] = {}
    for i, spec in enumerate(specs):
        d: dict[str, Any]
        if isinstance(spec, str):
            role, _, key = spec.partition(":")
            d = {"role": role}
            if key:
                d["key"] = key
        elif isinstance(spec, dict):
            d = dict(spec)
        else:
            raise CompileError(f"{what} role #{i}: expected a str or dict, got {spec!r}")
        if d.get("role") not in allowed:
            raise CompileError(
                f"{what} role #{i}: unknown role {d.get('role')!r}; "
                f"expected one of {', '.join(allowed)}"
            )
        role = d["role"]
        if role in KEYED_ROLES:
            if not d.get("key"):
                raise CompileError(f"{what} role #{i} ({role}) needs a key, e.g. '{role}:lr'")
        else:
            d.pop("key", None)
        if role in INDEXED_ROLES:
            d.setdefault("index", counters.get(role, 0))
            counters[role] = d["index"] + 1
        else:
            d.pop("index", None)
        out.append(d)
    return out


def _slot_name(d: dict, output: bool) -> str:
    role = d["role"]
    base: str = {
        "data": "X",
        "target": "y",
        "batch_size": "batch_size",
        "count": "num",
        "loss": "loss",
        "model_param": "param",
        "model_buffer": "buffer",
        "optimizer_state": "opt_state",
        "global_param": "global",
        "average": "avg",
        "item": "item",
    }.get(role, role)
    if role in KEYED_ROLES:
        base = re.sub(r"\W", "_", d["key"])
    if role in INDEXED_ROLES:
        base = f"{base}_{d['index']}"
    if output and role in ("model_param", "model_buffer", "optimizer_state", "average"):
        base = f"new_{base}"
    return base


def name_slots(inputs: list[dict], outputs: list[dict]) -> None:
    used: set[str] = set()
    for group, output in ((inputs, False), (outputs, True)):
        for d in group:
            name = _slot_name(d, output)
            while name in used:
                name += "_"
            used.add(name)
            d["name"] = name


def default_input_roles(kind: str, n: int) -> list[str]:
    if kind == "training":
        if n < 5:
            raise CompileError(
                "a training function takes (X, y, batch_size, lr, *params): at least 5 "
                f"example args, got {n}"
            )
        return ["data", "target", "batch_size", "client_config:lr"] + ["model_param"] * (n - 4)
    if kind == "evaluation":
        if n < 3:
            raise CompileError(
                f"an evaluation function takes (X, y, *params): at least 3 example args, got {n}"
            )
        return ["data", "target"] + ["model_param"] * (n - 2)
    if n < 3 or n % 2 == 0:
        raise CompileError(
            f"an averaging function takes (avg..., item..., num): an odd number >= 3 of "
            f"example args, got {n}"
        )
    k = (n - 1) // 2
    return ["average"] * k + ["item"] * k + ["count"]


def default_output_roles(kind: str, n: int, input_roles: list[dict]) -> list[str]:
    if kind == "training":
        n_params = sum(d["role"] == "model_param" for d in input_roles)
        n_buffers = sum(d["role"] == "model_buffer" for d in input_roles)
        n_state = sum(d["role"] == "optimizer_state" for d in input_roles)
        head = n - n_params - n_buffers - n_state
        if head not in (1, 2):
            raise CompileError(
                f"a training function returns (loss, acc, *updated_params): {n} outputs "
                f"for {n_params} params"
            )
        return (["loss", "metric:accuracy"][:head] + ["model_param"] * n_params
                + ["model_buffer"] * n_buffers + ["optimizer_state"] * n_state)
    if kind == "evaluation":
        return ["loss", "metric:accuracy"][:n] + [f"metric:metric_{i}" for i in range(2, n)]
    return ["average"] * n


def meta_entry(d: dict) -> dict:
    e = {"name": d["name"], "role": d["role"]}
    if "key" in d:
        e["key"] = d["key"]
    if "index" in d:
        e["index"] = d["index"]
    return e
