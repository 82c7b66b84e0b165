"""Hosting an FL process: validate everything a host request carries (configs, model,
plans, averaging plan, protocols), then store it and open cycle 1 in one transaction."""

from __future__ import annotations

import binascii
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gridfl import _messages
from gridfl._exceptions import ConfigError, ConflictError, GridflError, InvalidRequestError
from gridfl.server import aggregate as agg
from gridfl.server import db, privacy, storage, strategies
from gridfl.server.config import validate_client_config, validate_server_config
from gridfl.server.cycles import Cycles

log = logging.getLogger("gridfl.server")

_FIELDS = {"client_config", "server_config", "model", "plans", "averaging_plan", "protocols"}


@dataclass(frozen=True)
class HostRequest:
    """A validated host request: the rows to write."""

    client_config: dict
    server_config: dict
    model_bytes: bytes
    spec: agg.ModelSpec
    plan_rows: list[dict]  # worker plans, then the averaging plan if any
    protocol_rows: list[dict]


def host(engine: Engine, cycles: Cycles, payload: Any) -> dict[str, Any]:
    """Host an FL process atomically (validate everything, then one transaction)."""
    req = validate(payload)
    averaging = any(row["is_averaging"] for row in req.plan_rows)
    if req.server_config["durability"] == "cycle" and averaging and engine.dialect.name != "sqlite":
        # several processes each hold part of a cycle's reports, and a running plan average
        # cannot be combined from parts as sums can (docs/scaling.md)
        raise ConfigError(
            "server_config.durability 'cycle' with an averaging plan needs a single server "
            "process: it is available on SQLite only; use durability 'report' on PostgreSQL"
        )
    secure = req.server_config["secure_aggregation"] is not None
    if req.server_config["durability"] == "cycle" and secure and engine.dialect.name != "sqlite":
        # any server process may take a masked input, and a masked sum held in one
        # process's memory is not gathered from the others at the unmask stage
        raise ConfigError(
            "server_config.durability 'cycle' with secure_aggregation needs a single server "
            "process: it is available on SQLite only; use durability 'report' on PostgreSQL"
        )
    client_config = req.client_config
    name, version = client_config["name"], client_config["version"]
    now = time.time()
    try:
        with db.write(engine) as conn:
            if storage.process_exists(conn, name, version):
                raise ConflictError(f"FL Process already exists: '{name}' version '{version}'")
            pid = storage.insert_process(
                conn,
                name=name,
                version=version,
                status="running",
                client_config=client_config,
                server_config=req.server_config,
                created_at=now,
            )
            plan_ids = {}
            for row in req.plan_rows:
                plan_id = storage.insert_plan(conn, pid, row)
                if not row["is_averaging"]:
                    plan_ids[row["name"]] = plan_id
            protocol_ids = {}
            for row in req.protocol_rows:
                protocol_ids[row["name"]] = storage.insert_protocol(conn, pid, row)
            ckpt = storage.insert_checkpoint(conn, pid, 1, req.model_bytes, now)
            process = storage.process_by_id(conn, pid)
            cycles.open_next(conn, process, ckpt, now)
    except sa.exc.IntegrityError as e:
        raise ConflictError(f"FL Process already exists: '{name}' version '{version}'") from e
    log.info("hosted process %s/%s id=%s params=%d", name, version, pid, req.spec.total)
    return {
        "status": "success",
        "id": pid,
        "model_id": pid,
        "name": name,
        "version": version,
        "plans": plan_ids,
        "protocols": protocol_ids,
        "cycle": 1,
    }


def validate(payload: Any) -> HostRequest:  # noqa: C901 - every field, in the order reported
    """Check a host request's every field, in the order its errors are reported."""
    from gridfl import state
    from gridfl.plan import Plan

    if not isinstance(payload, dict):
        raise InvalidRequestError("host: expected a JSON object")
    unknown = set(payload) - _FIELDS
    if unknown:
        raise InvalidRequestError(f"host: unknown fields {sorted(unknown)}")
    client_config = validate_client_config(payload.get("client_config"))
    server_config = validate_server_config(payload.get("server_config"))
    client_config = privacy.worker_settings(client_config, server_config)
    model_bytes = _b64(payload.get("model"), "model")
    try:
        params = state.loads(model_bytes)
    except GridflError as e:
        raise InvalidRequestError(f"model: not valid State bytes: {e}") from e
    if not params:
        raise InvalidRequestError("model: the State holds no tensors")
    for i, p in enumerate(params):
        if p.dtype.kind == "f" and not np.isfinite(p).all():
            raise InvalidRequestError(f"model: tensor {i} has NaN or infinite values")
    spec = agg.ModelSpec.of(params)
    if server_config["compression"] is not None and not spec.all_float:
        raise ConfigError(
            "server_config.compression needs a model of float tensors only; this one has "
            f"{', '.join(sorted({str(d) for d in spec.dtypes if d.kind != 'f'}))} tensors"
        )

    raw_plans = payload.get("plans")
    if not isinstance(raw_plans, dict) or not raw_plans:
        raise InvalidRequestError("plans: expected an object of name -> plan (at least one)")
    plan_rows = []
    evaluation_plans = []
    loaded: dict[str, tuple[Any, list[str]]] = {}  # name -> (onnx plan or None, variants)
    for name, value in raw_plans.items():
        if not isinstance(name, str) or not name or len(name) > 255:
            raise InvalidRequestError("plans: names must be non-empty strings")
        _messages.check_text(name, "a plan name")  # PostgreSQL stores no NUL: a 500 before
        variants = {"onnx": value} if isinstance(value, str) else value
        if not isinstance(variants, dict) or not variants:
            raise InvalidRequestError(
                f"plans.{name}: expected base64 ONNX bytes or an object variant -> base64"
            )
        row: dict[str, Any] = {"name": name, "is_averaging": False}
        for variant, blob in variants.items():
            if variant not in _messages.PLAN_VARIANTS:
                raise InvalidRequestError(
                    f"plans.{name}: unknown variant {variant!r}; "
                    f"known: {', '.join(_messages.PLAN_VARIANTS)}"
                )
            row[variant] = _b64(blob, f"plans.{name}.{variant}")
        if "onnx" in row:
            try:
                plan = Plan.from_bytes(row["onnx"], threads=1)
            except GridflError as e:
                raise InvalidRequestError(f"plans.{name}: not a loadable plan: {e}") from e
            if plan.kind not in ("training", "evaluation"):
                raise InvalidRequestError(
                    f"plans.{name}: kind is {plan.kind!r}; worker plans are training or "
                    "evaluation (send averaging plans as 'averaging_plan')"
                )
            check_plan_params(name, plan, spec)
            if plan.kind == "evaluation":
                evaluation_plans.append(name)
        loaded[name] = (plan if "onnx" in row else None, list(variants))
        plan_rows.append(row)
    if server_config.get("evaluation") is not None and not evaluation_plans:
        raise ConfigError(
            "server_config.evaluation needs an evaluation plan (an ONNX plan of kind "
            "'evaluation', e.g. from gridfl.compiler.compile_evaluation_plan) among the "
            "hosted plans; host one or remove server_config.evaluation"
        )

    if payload.get("averaging_plan") is not None:
        blob = _b64(payload["averaging_plan"], "averaging_plan")
        try:
            plan = Plan.from_bytes(blob, threads=1)
        except GridflError as e:
            raise InvalidRequestError(f"averaging_plan: not a loadable plan: {e}") from e
        check_averaging_plan(plan, spec)
        if not server_config["iterative_plan"]:
            raise ConfigError(
                "an averaging_plan needs server_config.iterative_plan = true: gridfl folds "
                "diffs in one at a time (avg = plan(avg, diff, n)) and never holds them all"
            )
        plan_rows.append({"name": "averaging_plan", "is_averaging": True, "onnx": blob})
    strategies.check_hosting(
        server_config["strategy"], spec, payload.get("averaging_plan") is not None
    )
    client_config = strategies.check_proximal(server_config["strategy"], loaded, client_config)

    raw_protocols = payload.get("protocols") or {}
    if not isinstance(raw_protocols, dict):
        raise InvalidRequestError("protocols: expected an object of name -> base64 bytes")
    protocol_rows = [
        {"name": _messages.check_text(n, "a protocol name"), "data": _b64(v, f"protocols.{n}")}
        for n, v in raw_protocols.items()
    ]
    protocol_rows += secure_aggregation_rows(server_config, raw_protocols)
    return HostRequest(client_config, server_config, model_bytes, spec, plan_rows, protocol_rows)


def secure_aggregation_rows(server_config: dict, raw_protocols: dict) -> list[dict]:
    """The secure-aggregation descriptor as a protocol row, served by ``get-protocol`` so
    that workers know what to run (``job.protocols``)."""
    if not raw_protocols and server_config.get("secure_aggregation") is None:
        return []  # nothing to check: gridfl.secagg (cryptography) stays unimported
    from gridfl import secagg

    if secagg.NAME in raw_protocols:
        raise InvalidRequestError(
            f"protocols.{secagg.NAME}: the name is reserved; configure it in "
            "server_config.secure_aggregation"
        )
    cfg = server_config.get("secure_aggregation")
    if cfg is None:
        return []
    return [{"name": secagg.NAME, "data": secagg.SecAggParams(**cfg).descriptor_bytes()}]


def check_plan_params(name: str, plan, spec: agg.ModelSpec) -> None:
    """A worker plan's ``model_param``, ``global_param`` and ``model_buffer`` inputs must
    name the model's tensors, shapes too (buffer ``j`` is tensor ``num_params + j``)."""
    n = len(spec.shapes)
    n_params = sum(slot.role == "model_param" for slot in plan.inputs)
    for slot in plan.inputs:
        if slot.role not in ("model_param", "model_buffer", "global_param"):
            continue
        index = slot.index if slot.index is None or slot.role != "model_buffer" else (
            n_params + slot.index)
        if index is None or not 0 <= index < n:
            raise InvalidRequestError(
                f"plans.{name}: input {slot.name!r} is {slot.role} {slot.index}; "
                f"the model has {n} tensors (params first, then buffers)"
            )
        shape = getattr(slot, "shape", None)
        if (
            shape is not None
            and all(isinstance(d, int) for d in shape)
            and tuple(shape) != spec.shapes[index]
        ):
            raise InvalidRequestError(
                f"plans.{name}: input {slot.name!r} has shape {list(shape)}; model "
                f"tensor {index} is {spec.describe(index)}"
            )


def check_averaging_plan(plan, spec: agg.ModelSpec) -> None:
    """An averaging plan must have PyGrid's iterative signature for this model."""
    if plan.kind != "averaging":
        raise InvalidRequestError(f"averaging_plan: kind is {plan.kind!r}, not 'averaging'")
    n = len(spec.shapes)
    roles = [(s.role, s.index) for s in plan.inputs]
    want = {("average", i) for i in range(n)} | {("item", i) for i in range(n)}
    counts = [r for r in roles if r[0] == "count"]
    if set(r for r in roles if r[0] != "count") != want or len(counts) != 1:
        raise InvalidRequestError(
            f"averaging_plan: inputs must be average 0..{n - 1}, item 0..{n - 1} and one "
            "count (PyGrid's iterative signature (avg, item, num) -> new_avg)"
        )
    outs = {(s.role, s.index) for s in plan.outputs}
    if outs != {("average", i) for i in range(n)}:
        raise InvalidRequestError(f"averaging_plan: outputs must be average 0..{n - 1}")


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{what}: expected a non-empty base64 string")
    try:
        return _messages.b64decode(value)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what}: not valid base64") from None
