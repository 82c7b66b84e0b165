"""The grid node's logic, transport-agnostic: every handler takes parsed input and returns a
JSON-able ``dict`` (or bytes), raising :mod:`gridfl._exceptions` errors.

Both transports (HTTP routes, WebSocket) call these methods from a worker thread.
Concurrency: every write is one database transaction; a cycle's row is locked
(``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) by every write that
touches the cycle, so reports, their fold-in and the cycle's completion serialize per cycle
and a cycle completes exactly once, even with several server processes on one database.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import logging
import math
import os
import random
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gridfl import _wire
from gridfl._exceptions import (
    ConfigError,
    ConflictError,
    GridError,
    GridflError,
    InvalidRequestError,
    ModelError,
    NotFoundError,
    PermissionDeniedError,
)
from gridfl.server import aggregate as agg
from gridfl.server import db
from gridfl.server import statements as q
from gridfl.server.auth import verify_worker_token
from gridfl.server.config import (
    requires_speed_test,
    validate_client_config,
    validate_server_config,
    worker_capacity,
)
from gridfl.server.settings import Settings
from gridfl.server.tables import (
    aggregates,
    checkpoints,
    cycles,
    plans,
    processes,
    protocols,
    worker_cycles,
    workers,
)

log = logging.getLogger("gridfl.server")

#: PostgreSQL channel on which a server process announces each cycle it opens (payload:
#: its GridNode.instance_id), so the other processes on the database wake their long-polled
#: cycle requests within milliseconds (app.py listens), not at their next recheck.
CYCLE_CHANNEL = "gridfl_cycles"


def _test_crash_point(name: str) -> None:
    """TEST-ONLY fault injection: with ``GRIDFL_TEST_CRASH_AT=<name>`` in the environment the
    process dies here (``os._exit(137)``, as abruptly as ``kill -9``: no cleanup, no commit).

    Points: ``report`` (inside a report's transaction, after the diff is folded in and
    the worker marked reported, before commit) and ``aggregate`` (inside the completion
    transaction, after the new checkpoint row is written and the cycle marked completed,
    before commit). Used by tests/faults/ to prove a crash there leaves nothing half-done.
    Never set it in production.
    """
    if os.environ.get("GRIDFL_TEST_CRASH_AT") == name:
        log.warning("GRIDFL_TEST_CRASH_AT=%s: exiting abruptly (test-only fault injection)", name)
        logging.shutdown()
        os._exit(137)


def _status(err, status: int):
    err.http_status = status
    return err


def _not_found_400(message: str) -> NotFoundError:
    """PyGrid answers these lookups with 400 and syft.js's tests expect it."""
    return _status(NotFoundError(message), 400)


def _invalid_key():
    from gridfl._exceptions import AuthenticationError

    return AuthenticationError(_wire.MSG_INVALID_REQUEST_KEY)


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{what}: expected a non-empty base64 string")
    try:
        return _wire.b64decode(value)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what}: not valid base64") from None


class _LRU:
    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        return None

    def put(self, key, value):
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)

    def pop(self, key):
        with self.lock:
            self.data.pop(key, None)


@dataclass(frozen=True)
class _ProcessInfo:
    """What never changes about a hosted process (its status does, and is always read).
    Ids are never reused (AUTOINCREMENT / sequences), so these can be cached by id."""

    id: int
    name: str
    version: str
    client_config: dict
    server_config: dict
    plan_ids: dict[str, int]
    protocol_ids: dict[str, int]
    averaging_plan_id: int | None
    plan_digests: dict[str, str]  # SHA-256 of each training-side plan's onnx variant


class GridNode:
    """One grid node process's view of the database; thread-safe."""

    def __init__(self, settings: Settings | None = None, *, migrate: bool = True):
        self.settings = settings or Settings()
        self.url = self.settings.resolved_database_url()
        self.engine = db.create_engine(self.url)
        if migrate:
            db.migrate(self.engine)
        # checkpoint id -> (bytes, params, spec): the open cycle's and the one before
        self._checkpoint_cache = _LRU(2)
        self._plan_cache = _LRU(64)  # (plan id, variant) -> bytes
        self._avg_plan_cache = _LRU(8)  # plan id -> Plan
        self._process_cache = _LRU(64)  # process id -> _ProcessInfo
        self._plan_meta_cache = _LRU(64)  # plan id -> its row in q.plan_meta
        # cycle id -> [version, sum_w, sum_x]; version -1 while a fold is in flight
        self._agg_cache: dict[int, list] = {}
        self._agg_lock = threading.Lock()
        #: called (from any thread) when a cycle opens or closes and when a process stops
        #: or goes: the deadline timer re-plans and held requests look again
        self.on_cycles_changed: Callable[[], None] = lambda: None
        #: tells this process's own CYCLE_CHANNEL notifications from the others'
        self.instance_id = uuid.uuid4().hex
        self._notify_others = self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ helpers
    def _process_by_name(self, conn: Connection, name: str, version: str | None):
        q = sa.select(processes).where(processes.c.name == name)
        if version is not None:
            q = q.where(processes.c.version == version)
        row = conn.execute(q.order_by(processes.c.id.desc()).limit(1)).first()
        if row is None:
            v = f" version '{version}'" if version is not None else ""
            raise NotFoundError(f"no FL process named '{name}'{v} is hosted here")
        return row

    def _checkpoint(self, conn: Connection, checkpoint_id: int):
        hit = self._checkpoint_cache.get(checkpoint_id)
        if hit is not None:
            return hit
        from gridfl import state

        data = conn.execute(
            sa.select(checkpoints.c.data).where(checkpoints.c.id == checkpoint_id)
        ).scalar_one()
        data = bytes(data)
        params = state.loads(data)
        value = (data, params, agg.ModelSpec.of(params))
        self._checkpoint_cache.put(checkpoint_id, value)
        return value

    def _process_info(self, conn: Connection, process_id: int) -> _ProcessInfo:
        info = self._process_cache.get(process_id)
        if info is None:
            row = conn.execute(q.process_row, {"process_id": process_id}).one()
            plan_rows = conn.execute(q.process_plans, {"process_id": process_id}).all()
            info = _ProcessInfo(
                id=row.id,
                name=row.name,
                version=row.version,
                client_config=row.client_config,
                server_config=row.server_config,
                plan_ids={r.name: r.id for r in plan_rows if not r.is_averaging},
                protocol_ids={
                    r.name: r.id
                    for r in conn.execute(q.process_protocols, {"process_id": process_id})
                },
                averaging_plan_id=next((r.id for r in plan_rows if r.is_averaging), None),
                plan_digests={
                    r.name: hashlib.sha256(r.onnx).hexdigest()
                    for r in conn.execute(q.process_plan_bytes, {"process_id": process_id})
                    if r.onnx is not None
                },
            )
            self._process_cache.put(process_id, info)
        return info

    def _averaging_plan(self, conn: Connection, process_id: int):
        plan_id = self._process_info(conn, process_id).averaging_plan_id
        if plan_id is None:
            return None
        plan = self._avg_plan_cache.get(plan_id)
        if plan is None:
            from gridfl.plan import Plan

            onnx = conn.execute(sa.select(plans.c.onnx).where(plans.c.id == plan_id)).scalar_one()
            plan = Plan.from_bytes(bytes(onnx), threads=1)
            self._avg_plan_cache.put(plan_id, plan)
        return plan

    def _timeout(self, cycle) -> int:
        if cycle is None or cycle.end_at is None:
            return self.settings.retry_seconds
        return max(0, math.ceil(cycle.end_at - time.time()))

    def _open_cycle(self, conn: Connection, process_id: int, *, lock: bool = False):
        q = sa.select(cycles).where(cycles.c.process_id == process_id, cycles.c.status == "open")
        if lock:
            q = q.with_for_update()
        return conn.execute(q).first()

    def _announce(self, conn: Connection) -> None:
        """PostgreSQL: tell the other server processes on this database that a cycle opened
        or a process stopped running (NOTIFY on ``CYCLE_CHANNEL``, delivered when and only
        if this transaction commits), so what they hold for it is answered at once."""
        if self._notify_others:
            conn.execute(sa.select(sa.func.pg_notify(CYCLE_CHANNEL, self.instance_id)))

    def _new_cycle(self, conn: Connection, process, checkpoint_id: int, now: float) -> int:
        seq = conn.execute(
            sa.select(sa.func.coalesce(sa.func.max(cycles.c.sequence), 0)).where(
                cycles.c.process_id == process.id
            )
        ).scalar_one()
        length = process.server_config.get("cycle_length")
        self._announce(conn)
        return conn.execute(
            cycles.insert().values(
                process_id=process.id,
                sequence=seq + 1,
                checkpoint_id=checkpoint_id,
                start_at=now,
                end_at=None if length is None else now + float(length),
                status="open",
                num_reports=0,
            )
        ).inserted_primary_key[0]

    # ------------------------------------------------------------------ hosting
    def host(self, payload: Any) -> dict[str, Any]:
        """Host an FL process atomically (validate everything, then one transaction)."""
        from gridfl import state
        from gridfl.plan import Plan

        if not isinstance(payload, dict):
            raise InvalidRequestError("host: expected a JSON object")
        known = {"client_config", "server_config", "model", "plans", "averaging_plan", "protocols"}
        unknown = set(payload) - known
        if unknown:
            raise InvalidRequestError(f"host: unknown fields {sorted(unknown)}")
        client_config = validate_client_config(payload.get("client_config"))
        server_config = validate_server_config(payload.get("server_config"))
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

        raw_plans = payload.get("plans")
        if not isinstance(raw_plans, dict) or not raw_plans:
            raise InvalidRequestError("plans: expected an object of name -> plan (at least one)")
        plan_rows = []
        for name, value in raw_plans.items():
            if not isinstance(name, str) or not name or len(name) > 255:
                raise InvalidRequestError("plans: names must be non-empty strings")
            _wire.check_text(name, "a plan name")  # PostgreSQL stores no NUL: a 500 before
            variants = {"onnx": value} if isinstance(value, str) else value
            if not isinstance(variants, dict) or not variants:
                raise InvalidRequestError(
                    f"plans.{name}: expected base64 ONNX bytes or an object variant -> base64"
                )
            row: dict[str, Any] = {"name": name, "is_averaging": False}
            for variant, blob in variants.items():
                if variant not in _wire.PLAN_VARIANTS:
                    raise InvalidRequestError(
                        f"plans.{name}: unknown variant {variant!r}; "
                        f"known: {', '.join(_wire.PLAN_VARIANTS)}"
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
                self._check_plan_params(name, plan, spec)
            plan_rows.append(row)

        avg_row = None
        if payload.get("averaging_plan") is not None:
            blob = _b64(payload["averaging_plan"], "averaging_plan")
            try:
                plan = Plan.from_bytes(blob, threads=1)
            except GridflError as e:
                raise InvalidRequestError(f"averaging_plan: not a loadable plan: {e}") from e
            self._check_averaging_plan(plan, spec)
            if not server_config["iterative_plan"]:
                raise ConfigError(
                    "an averaging_plan needs server_config.iterative_plan = true: gridfl folds "
                    "diffs in one at a time (avg = plan(avg, diff, n)) and never holds them all"
                )
            avg_row = {"name": "averaging_plan", "is_averaging": True, "onnx": blob}

        raw_protocols = payload.get("protocols") or {}
        if not isinstance(raw_protocols, dict):
            raise InvalidRequestError("protocols: expected an object of name -> base64 bytes")
        protocol_rows = [
            {"name": _wire.check_text(n, "a protocol name"), "data": _b64(v, f"protocols.{n}")}
            for n, v in raw_protocols.items()
        ]

        name, version = client_config["name"], client_config["version"]
        now = time.time()
        try:
            with db.write(self.engine) as conn:
                exists = conn.execute(
                    sa.select(processes.c.id).where(
                        processes.c.name == name, processes.c.version == version
                    )
                ).first()
                if exists:
                    raise ConflictError(f"FL Process already exists: '{name}' version '{version}'")
                pid = conn.execute(
                    processes.insert().values(
                        name=name,
                        version=version,
                        status="running",
                        client_config=client_config,
                        server_config=server_config,
                        created_at=now,
                    )
                ).inserted_primary_key[0]
                plan_ids = {}
                for row in [*plan_rows, *([avg_row] if avg_row else [])]:
                    plan_id = conn.execute(
                        plans.insert().values(process_id=pid, **row)
                    ).inserted_primary_key[0]
                    if not row["is_averaging"]:
                        plan_ids[row["name"]] = plan_id
                protocol_ids = {}
                for row in protocol_rows:
                    protocol_ids[row["name"]] = conn.execute(
                        protocols.insert().values(process_id=pid, **row)
                    ).inserted_primary_key[0]
                ckpt = conn.execute(
                    checkpoints.insert().values(
                        process_id=pid, number=1, data=model_bytes, created_at=now
                    )
                ).inserted_primary_key[0]
                process = conn.execute(sa.select(processes).where(processes.c.id == pid)).one()
                self._new_cycle(conn, process, ckpt, now)
        except sa.exc.IntegrityError as e:
            raise ConflictError(f"FL Process already exists: '{name}' version '{version}'") from e
        log.info("hosted process %s/%s id=%s params=%d", name, version, pid, spec.total)
        self.on_cycles_changed()
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

    @staticmethod
    def _check_plan_params(name: str, plan, spec: agg.ModelSpec) -> None:
        n = len(spec.shapes)
        for slot in plan.inputs:
            if slot.role != "model_param":
                continue
            if slot.index is None or not 0 <= slot.index < n:
                raise InvalidRequestError(
                    f"plans.{name}: input {slot.name!r} is model_param {slot.index}; "
                    f"the model has {n} tensors"
                )
            shape = getattr(slot, "shape", None)
            if shape is not None and all(isinstance(d, int) for d in shape):
                if tuple(shape) != spec.shapes[slot.index]:
                    raise InvalidRequestError(
                        f"plans.{name}: input {slot.name!r} has shape {list(shape)}; model "
                        f"tensor {slot.index} is {spec.describe(slot.index)}"
                    )

    @staticmethod
    def _check_averaging_plan(plan, spec: agg.ModelSpec) -> None:
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

    # ------------------------------------------------------------------ worker API
    def authenticate(self, req: _wire.AuthenticateRequest) -> dict[str, Any]:
        with db.read(self.engine) as conn:
            process = self._process_by_name(conn, req.model_name, req.model_version)
        cfg = process.server_config
        claims = verify_worker_token(
            req.auth_token,
            cfg.get("authentication"),
            endpoint_timeout=self.settings.auth_endpoint_timeout,
        )
        worker_id = str(uuid.uuid4())
        sub = claims.get("sub") if claims else None
        identity = f"sub:{sub}"[:320] if isinstance(sub, str) and sub else worker_id
        with db.write(self.engine) as conn:
            conn.execute(
                workers.insert().values(
                    id=worker_id, process_id=process.id, identity=identity, created_at=time.time()
                )
            )
        return _wire.authenticate_response(worker_id, requires_speed_test(cfg))

    def cycle_request(self, req: _wire.CycleRequest) -> dict[str, Any]:
        if req.ping is None and req.download is None and req.upload is None:
            full = self._full_cycle_rejection(req)
            if full is not None:
                return full
        with db.write(self.engine) as conn:
            return self._admit(conn, req)

    def admit_held(self, reqs: Sequence[_wire.CycleRequest]) -> list[dict[str, Any] | Exception]:
        """Cycle requests that were held until a cycle opened, answered together: one write
        transaction for all of them (a savepoint each, so one failing request leaves the
        others' seats), where :meth:`cycle_request` would take one each, and each after a
        read-only look. When a cycle opens, every worker waiting for it asks at once.
        Returns each request's reply, or the error it raised, in order.

            >>> node.admit_held([req_a, req_b])  # doctest: +SKIP
            [{'status': 'accepted', ...}, {'status': 'rejected', ...}]
        """
        results: list[dict[str, Any] | Exception] = []
        with db.write(self.engine) as conn:
            for req in reqs:
                try:
                    with conn.begin_nested():
                        results.append(self._admit(conn, req))
                except Exception as e:  # noqa: BLE001 - it is this request's answer
                    results.append(e)
        return results

    def _admit(self, conn: Connection, req: _wire.CycleRequest) -> dict[str, Any]:
        """Accept or reject one cycle request, inside the caller's write transaction."""
        worker = conn.execute(q.worker_process, {"worker_id": req.worker_id}).first()
        if worker is None:
            raise _not_found_400(_wire.MSG_WORKER_NOT_FOUND)
        process = self._process_info(conn, worker.process_id)
        if process.name != req.model or (
            req.version is not None and req.version != process.version
        ):
            raise PermissionDeniedError(
                f"this worker_id was issued for '{process.name}' version "
                f"'{process.version}'; authenticate for '{req.model}' first"
            )
        cfg = process.server_config
        if requires_speed_test(cfg):
            for key in ("ping", "download", "upload"):
                if getattr(req, key) is None:
                    raise InvalidRequestError(f"'{key}' is required")
        if req.ping is not None or req.download is not None or req.upload is not None:
            conn.execute(
                workers.update()
                .where(workers.c.id == worker.id)
                .values(ping=req.ping, download=req.download, upload=req.upload)
            )
        if worker.status != "running":
            return _wire.rejected_response(None, f"the FL process is {worker.status}")
        cycle = conn.execute(q.open_cycle_locked, {"process_id": process.id}).first()
        if cycle is None:
            return _wire.rejected_response(None, "the FL process has no open cycle")
        timeout = self._timeout(cycle)
        seats = conn.execute(q.seats, {"cycle_id": cycle.id, "worker_id": worker.id}).one()
        if seats.taken is not None:
            return _wire.rejected_response(timeout, "already accepted into this cycle")
        for key, limit_key in (
            ("download", "minimum_download_speed"),
            ("upload", "minimum_upload_speed"),
        ):
            limit = cfg.get(limit_key)
            value = getattr(req, key)
            if limit is not None and value < limit:
                return _wire.rejected_response(
                    timeout, f"{key} speed {value:g} Mbit/s is below the minimum {limit:g}"
                )
        k = cfg.get("do_not_reuse_workers_until_cycle") or 0
        if k > 1:
            last = conn.execute(
                sa.select(sa.func.max(cycles.c.sequence))
                .select_from(
                    worker_cycles.join(cycles, worker_cycles.c.cycle_id == cycles.c.id)
                )
                .where(
                    worker_cycles.c.identity == worker.identity,
                    cycles.c.process_id == process.id,
                )
            ).scalar()
            if last is not None and cycle.sequence < last + k:
                return _wire.rejected_response(
                    timeout,
                    f"this worker took part in cycle {last}; it may join again from "
                    f"cycle {last + k}",
                )
        cap = worker_capacity(cfg)
        if cap is not None:
            if seats.accepted >= cap:
                return _wire.rejected_response(timeout, "the cycle is full")
            if cfg.get("pool_selection") == "random" and random.random() >= (
                (cap - seats.accepted) / cap
            ):
                return _wire.rejected_response(timeout, "not selected (random pool selection)")
        request_key = secrets.token_hex(32)
        conn.execute(
            q.accept,
            {
                "cycle_id": cycle.id,
                "worker_id": worker.id,
                "identity": worker.identity,
                "request_key": request_key,
                "accepted_at": time.time(),
            },
        )
        return _wire.accepted_response(
            request_key=request_key,
            model=process.name,
            version=process.version,
            model_id=process.id,
            plans=dict(process.plan_ids),
            protocols=dict(process.protocol_ids),
            client_config=process.client_config,
            plan_digests=dict(process.plan_digests),
        )

    def _full_cycle_rejection(self, req: _wire.CycleRequest) -> dict[str, Any] | None:
        """Fast path, read-only: the rejection of a request for a cycle that is already
        full, or ``None`` to take the locked path. Workers long-polling a full cycle
        re-ask whenever a cycle opens or closes; without this each re-ask would be a
        write transaction holding the cycle's row lock, which reports queue behind.
        Accepted counts only grow within a cycle, so a committed count at the cap is final.
        """
        with db.read(self.engine) as conn:
            row = conn.execute(q.admission, {"worker_id": req.worker_id}).first()
            if row is None or row.cycle_id is None or row.process_status != "running":
                return None
            process = self._process_info(conn, row.process_id)
        cfg = process.server_config
        cap = worker_capacity(cfg)
        if (
            cap is None
            or row.accepted < cap
            or process.name != req.model
            or (req.version is not None and req.version != process.version)
            or requires_speed_test(cfg)
        ):
            return None
        reason = (
            "already accepted into this cycle" if row.taken is not None else "the cycle is full"
        )
        return _wire.rejected_response(self._timeout(row), reason)

    def _check_asset_access(self, conn: Connection, process_id: int, worker_id: str, key: str):
        """The worker must hold ``key`` for the process's currently open cycle; returns
        the cycle (``id``, ``checkpoint_id``)."""
        row = conn.execute(
            q.asset_access, {"process_id": process_id, "worker_id": worker_id}
        ).first()
        if row is not None and row.request_key is not None:
            if hmac.compare_digest(row.request_key.encode(), key.encode()):
                return row
            raise _invalid_key()
        # refused: find out why, in the order PyGrid reports it
        worker = conn.execute(
            sa.select(workers.c.id, workers.c.process_id).where(workers.c.id == worker_id)
        ).first()
        if worker is None:
            raise _not_found_400(_wire.MSG_WORKER_NOT_FOUND)
        if row is None:
            raise _not_found_400("Cycle not found!")
        raise _invalid_key()

    def get_model(self, req: _wire.AssetRequest) -> bytes:
        with db.read(self.engine) as conn:
            try:
                cycle = self._check_asset_access(conn, req.asset_id, req.worker_id, req.request_key)
            except GridError:
                exists = conn.execute(
                    sa.select(processes.c.id).where(processes.c.id == req.asset_id)
                ).first()
                if exists is None:
                    raise _not_found_400(_wire.MSG_MODEL_NOT_FOUND) from None
                raise
            return self._checkpoint(conn, cycle.checkpoint_id)[0]

    def get_plan(self, req: _wire.AssetRequest) -> bytes:
        with db.read(self.engine) as conn:
            row = self._plan_meta_cache.get(req.asset_id)
            if row is None:
                row = conn.execute(q.plan_meta, {"plan_id": req.asset_id}).first()
                if row is None:
                    raise _not_found_400(_wire.MSG_PLAN_NOT_FOUND)
                self._plan_meta_cache.put(req.asset_id, row)
            try:
                self._check_asset_access(conn, row.process_id, req.worker_id, req.request_key)
            except GridError:
                # refused: the plan may have gone with its process since it was cached
                if conn.execute(q.plan_meta, {"plan_id": req.asset_id}).first() is None:
                    self._plan_meta_cache.pop(req.asset_id)
                    raise _not_found_400(_wire.MSG_PLAN_NOT_FOUND) from None
                raise
            have = [v for v in _wire.PLAN_VARIANTS if getattr(row, f"has_{v}")]
            variant = req.receive_operations_as or have[0]
            if variant not in have:
                raise InvalidRequestError(
                    f"plan '{row.name}' has no '{variant}' variant; it has: {', '.join(have)}"
                )
            hit = self._plan_cache.get((row.id, variant))
            if hit is None:
                hit = bytes(
                    conn.execute(sa.select(plans.c[variant]).where(plans.c.id == row.id)).scalar()
                )
                self._plan_cache.put((row.id, variant), hit)
            return hit

    def get_protocol(self, req: _wire.AssetRequest) -> bytes:
        with db.read(self.engine) as conn:
            row = conn.execute(
                sa.select(protocols.c.process_id, protocols.c.data).where(
                    protocols.c.id == req.asset_id
                )
            ).first()
            if row is None:
                raise _not_found_400(_wire.MSG_PROTOCOL_NOT_FOUND)
            self._check_asset_access(conn, row.process_id, req.worker_id, req.request_key)
            return bytes(row.data)

    def check_worker(self, worker_id: str) -> None:
        with db.read(self.engine) as conn:
            if conn.execute(sa.select(workers.c.id).where(workers.c.id == worker_id)).first():
                return
        raise _not_found_400(_wire.MSG_WORKER_NOT_FOUND)

    # ------------------------------------------------------------------ reports
    def report(self, req: _wire.ReportRequest) -> dict[str, Any]:
        from gridfl import state

        # 1. find the worker's cycle by its request key (constant-time compare), no lock
        with db.read(self.engine) as conn:
            rows = conn.execute(q.worker_seats, {"worker_id": req.worker_id}).all()
            if not rows:
                if conn.execute(
                    sa.select(workers.c.id).where(workers.c.id == req.worker_id)
                ).first():
                    raise _invalid_key()
                raise _not_found_400(_wire.MSG_WORKER_NOT_FOUND)
            match = None
            for r in rows:
                if hmac.compare_digest(r.request_key.encode(), req.request_key.encode()):
                    match = r
            if match is None:
                raise _invalid_key()
            if match.reported_at is not None:
                raise ConflictError(f"this worker already reported for cycle {match.sequence}")
            if match.status != "open":
                raise ConflictError(
                    f"cycle {match.sequence} is closed ({match.status}): the report came too late"
                )
            _, _, spec = self._checkpoint(conn, match.checkpoint_id)
        # 2. decode and validate the diff outside any lock
        try:
            # refused as soon as it departs from the model: cost O(model tensors), not O(bytes)
            diff = state.loads(req.diff, expect=zip(spec.shapes, spec.dtypes, strict=True))
        except GridflError as e:
            raise InvalidRequestError(f"diff is not valid State bytes: {e}") from e
        agg.validate_diff(diff, spec)
        # 3. fold in, mark reported, maybe complete: one transaction, cycle row locked
        completed = False
        cycle_id = match.cycle_id
        try:
            with db.write(self.engine) as conn:
                cycle = conn.execute(q.cycle_locked, {"cycle_id": cycle_id}).one()
                if cycle.status != "open":
                    raise ConflictError(
                        f"cycle {cycle.sequence} is closed ({cycle.status}): "
                        "the report came too late"
                    )
                seat = conn.execute(
                    q.report_check, {"seat_id": match.id, "cycle_id": cycle_id}
                ).one()
                if seat.reported_at is not None:
                    raise ConflictError(f"this worker already reported for cycle {cycle.sequence}")
                process = self._process_info(conn, cycle.process_id)
                state_ = self._load_aggregate(conn, cycle_id, spec)
                version, count_w, count_x, weight, sum_w, sum_x = state_
                avg_plan = self._averaging_plan(conn, process.id)
                values: dict[str, Any] = {"b_cycle_id": cycle_id, "version": version + 1}
                if avg_plan is not None:
                    if count_x == 0:
                        sum_x = agg.new_sum(spec)
                        agg.fold(sum_x, diff, spec)
                    else:
                        sum_x = agg.averaging_step(avg_plan, sum_x, diff, count_x, spec)
                    count_x += 1
                    values.update(count_x=count_x, sum_x=memoryview(sum_x).cast("B"))
                elif req.num_samples is not None:
                    if sum_w is None:
                        sum_w = agg.new_sum(spec)
                    agg.fold(sum_w, diff, spec, weight=req.num_samples)
                    count_w += 1
                    weight += req.num_samples
                    values.update(count_w=count_w, weight=weight, sum_w=memoryview(sum_w).cast("B"))
                else:
                    if sum_x is None:
                        sum_x = agg.new_sum(spec)
                    agg.fold(sum_x, diff, spec)
                    count_x += 1
                    values.update(count_x=count_x, sum_x=memoryview(sum_x).cast("B"))
                conn.execute(q.store_sums, values)
                now = time.time()
                conn.execute(
                    q.mark_reported,
                    {
                        "b_seat_id": match.id,
                        "reported_at": now,
                        "num_samples": req.num_samples,
                        "metrics": req.metrics,
                    },
                )
                received = cycle.num_reports + 1
                conn.execute(q.count_report, {"b_cycle_id": cycle_id, "num_reports": received})
                _test_crash_point("report")
                if self._ready(
                    conn, cycle, process.server_config, received, now, accepted=seat.accepted
                ):
                    self._complete(
                        conn, cycle, process, spec, (count_w, weight, sum_w, count_x, sum_x)
                    )
                    completed = True
        except BaseException:
            with self._agg_lock:
                self._agg_cache.pop(cycle_id, None)
            raise
        with self._agg_lock:
            if completed:
                self._agg_cache.pop(cycle_id, None)
            else:
                self._agg_cache[cycle_id] = [version + 1, sum_w, sum_x]
        if completed:
            self.on_cycles_changed()
        return _wire.report_response()

    def _load_aggregate(self, conn: Connection, cycle_id: int, spec: agg.ModelSpec):
        """The cycle's running sums (cached in memory, checked against the row's version)."""
        row = conn.execute(q.aggregate_counts, {"cycle_id": cycle_id}).first()
        if row is None:
            conn.execute(aggregates.insert().values(cycle_id=cycle_id, version=0))
            version, count_w, count_x, weight = 0, 0, 0, 0.0
        else:
            version, count_w, count_x, weight = row.version, row.count_w, row.count_x, row.weight
        with self._agg_lock:
            cached = self._agg_cache.get(cycle_id)
            if cached is not None and cached[0] == version:
                cached[0] = -1  # a fold is in flight: nobody else may trust these arrays
                return version, count_w, count_x, weight, cached[1], cached[2]
        sum_w = sum_x = None
        if count_w or count_x:
            blobs = conn.execute(q.aggregate_sums, {"cycle_id": cycle_id}).one()
            if blobs.sum_w is not None:
                sum_w = np.frombuffer(blobs.sum_w, dtype=spec.acc_dtype).copy()
            if blobs.sum_x is not None:
                sum_x = np.frombuffer(blobs.sum_x, dtype=spec.acc_dtype).copy()
        return version, count_w, count_x, weight, sum_w, sum_x

    @staticmethod
    def _ready(
        conn: Connection,
        cycle,
        cfg: dict,
        received: int,
        now: float,
        *,
        accepted: int | None = None,
    ) -> bool:
        """PyGrid's completion rule, plus: a full cycle whose workers all reported is done.
        ``accepted``: the cycle's seat count, if the caller already read it under the lock."""
        if received < max(1, cfg.get("min_diffs") or 1):
            return False
        if accepted is None:
            accepted = conn.execute(
                sa.select(sa.func.count())
                .select_from(worker_cycles)
                .where(worker_cycles.c.cycle_id == cycle.id)
            ).scalar_one()
        if accepted < (cfg.get("min_workers") or 0):
            return False
        max_diffs = cfg.get("max_diffs")
        if max_diffs is not None and received >= max_diffs:
            return True
        if cycle.end_at is not None and now >= cycle.end_at:
            return True
        if max_diffs is None and cycle.end_at is None:
            return True
        cap = worker_capacity(cfg)
        return cap is not None and accepted >= cap and received >= accepted

    def _complete(self, conn: Connection, cycle, process, spec, sums) -> None:
        """Aggregate, write the new checkpoint, close the cycle, open the next one; or
        expire the cycle when its result does not fit the model's dtypes."""
        from gridfl import state

        count_w, weight, sum_w, count_x, sum_x = sums
        _, params, _ = self._checkpoint(conn, cycle.checkpoint_id)
        if self._averaging_plan(conn, process.id) is not None:
            mean = sum_x
        else:
            mean = agg.mean_diff(sum_w, count_w, weight, sum_x, count_x)
        now = time.time()
        try:
            new_params = agg.apply_diff(params, mean, spec)
        except ModelError as e:
            self._expire(conn, cycle, process, now, f"its result is not usable: {e}", warn=True)
            return
        data = state.dumps(new_params)
        number = (
            conn.execute(
                sa.select(sa.func.max(checkpoints.c.number)).where(
                    checkpoints.c.process_id == process.id
                )
            ).scalar_one()
            + 1
        )
        # "latest" is the highest number: no alias moves from row to row, because any
        # UPDATE of a checkpoint row makes SQLite rewrite its whole model blob (13 MB of
        # WAL and ~70 ms for the McMahan CNN, inside the transaction that opens the next
        # cycle)
        ckpt = conn.execute(
            checkpoints.insert().values(
                process_id=process.id, number=number, data=data, created_at=now
            )
        ).inserted_primary_key[0]
        self._checkpoint_cache.put(ckpt, (data, new_params, spec))
        conn.execute(
            cycles.update()
            .where(cycles.c.id == cycle.id)
            .values(status="completed", closed_at=now, result_checkpoint_id=ckpt)
        )
        conn.execute(aggregates.delete().where(aggregates.c.cycle_id == cycle.id))
        done = conn.execute(
            sa.select(sa.func.count())
            .select_from(cycles)
            .where(cycles.c.process_id == process.id, cycles.c.status == "completed")
        ).scalar_one()
        num_cycles = process.server_config.get("num_cycles") or 0
        log.info(
            "cycle %s/%s #%d completed: checkpoint %d",
            process.name,
            process.version,
            cycle.sequence,
            number,
        )
        if num_cycles and done >= num_cycles:
            conn.execute(
                processes.update().where(processes.c.id == process.id).values(status="finished")
            )
            self._announce(conn)
            log.info("process %s/%s finished", process.name, process.version)
        else:
            self._new_cycle(conn, process, ckpt, now)
        _test_crash_point("aggregate")

    def _expire(
        self, conn: Connection, cycle, process, now: float, why: str, *, warn: bool = False
    ) -> None:
        """Close the cycle without a checkpoint: its reports are dropped and a new cycle
        opens on the same checkpoint."""
        conn.execute(
            cycles.update().where(cycles.c.id == cycle.id).values(status="expired", closed_at=now)
        )
        conn.execute(aggregates.delete().where(aggregates.c.cycle_id == cycle.id))
        self._new_cycle(conn, process, cycle.checkpoint_id, now)
        log.log(
            logging.WARNING if warn else logging.INFO,
            "cycle %s/%s #%d expired with %d reports: %s",
            process.name,
            process.version,
            cycle.sequence,
            cycle.num_reports,
            why,
        )

    # ------------------------------------------------------------------ deadlines
    def next_deadline(self) -> float | None:
        with db.read(self.engine) as conn:
            return conn.execute(
                sa.select(sa.func.min(cycles.c.end_at)).where(
                    cycles.c.status == "open", cycles.c.end_at.is_not(None)
                )
            ).scalar()

    def cycle_marker(self) -> tuple[int | None, int]:
        """(newest open cycle id, number of open cycles): changes whenever a cycle opens or
        closes on this database, whichever server process did it. One cheap query; the
        app polls it every ``long_poll_recheck`` seconds to wake its long-polled requests."""
        with db.read(self.engine) as conn:
            row = conn.execute(
                sa.select(sa.func.max(cycles.c.id), sa.func.count())
                .select_from(cycles)
                .where(cycles.c.status == "open")
            ).one()
            return row[0], row[1]

    def close_due_cycles(self, now: float | None = None) -> int:
        """Close every open cycle past its deadline; returns how many closed."""
        now = time.time() if now is None else now
        with db.read(self.engine) as conn:
            due = (
                conn.execute(
                    sa.select(cycles.c.id).where(cycles.c.status == "open", cycles.c.end_at <= now)
                )
                .scalars()
                .all()
            )
        closed = 0
        for cycle_id in due:
            try:
                closed += self._close_at_deadline(cycle_id, now)
            except Exception:  # keep closing the others; the next wake-up retries
                log.exception("closing cycle %s at its deadline failed", cycle_id)
        if closed:
            self.on_cycles_changed()
        return closed

    def _close_at_deadline(self, cycle_id: int, now: float) -> int:
        try:
            with db.write(self.engine) as conn:
                cycle = conn.execute(
                    sa.select(cycles).where(cycles.c.id == cycle_id).with_for_update()
                ).one()
                if cycle.status != "open" or cycle.end_at is None or cycle.end_at > now:
                    return 0
                process = conn.execute(
                    sa.select(processes).where(processes.c.id == cycle.process_id)
                ).one()
                cfg = process.server_config
                if self._ready(conn, cycle, cfg, cycle.num_reports, now):
                    _, _, spec = self._checkpoint(conn, cycle.checkpoint_id)
                    _, count_w, count_x, weight, sum_w, sum_x = self._load_aggregate(
                        conn, cycle_id, spec
                    )
                    self._complete(
                        conn, cycle, process, spec, (count_w, weight, sum_w, count_x, sum_x)
                    )
                else:
                    self._expire(
                        conn, cycle, process, now, "too few reports (min_diffs) or workers"
                    )
        finally:
            with self._agg_lock:
                self._agg_cache.pop(cycle_id, None)
        return 1

    # ------------------------------------------------------------------ admin
    def list_processes(self) -> list[dict[str, Any]]:
        with db.read(self.engine) as conn:
            rows = conn.execute(sa.select(processes).order_by(processes.c.id)).all()
            return [self._process_summary(conn, p) for p in rows]

    def _process_summary(self, conn: Connection, p) -> dict[str, Any]:
        cycle = self._open_cycle(conn, p.id)
        ckpt = conn.execute(
            sa.select(sa.func.max(checkpoints.c.number)).where(checkpoints.c.process_id == p.id)
        ).scalar()
        return {
            "id": p.id,
            "name": p.name,
            "version": p.version,
            "status": p.status,
            "created_at": p.created_at,
            "current_cycle": cycle.sequence if cycle else None,
            "latest_checkpoint": ckpt,
        }

    def status(self, name: str, version: str | None, *, last: int = 100) -> dict[str, Any]:
        """Configs, the ``last`` cycles (with their workers' counts and mean metrics) and
        as many of the latest checkpoints."""
        with db.read(self.engine) as conn:
            p = self._process_by_name(conn, name, version)
            out = self._process_summary(conn, p)
            cfg = dict(p.server_config)
            if cfg.get("authentication"):
                cfg["authentication"] = {
                    k: ("***" if k == "secret" else v) for k, v in cfg["authentication"].items()
                }
            out["server_config"] = cfg
            out["client_config"] = p.client_config
            now = time.time()
            cycle_rows = conn.execute(
                sa.select(cycles)
                .where(cycles.c.process_id == p.id)
                .order_by(cycles.c.sequence.desc())
                .limit(last)
            ).all()
            wcs: dict[int, list] = {}
            if cycle_rows:
                for r in conn.execute(
                    sa.select(
                        worker_cycles.c.cycle_id,
                        worker_cycles.c.reported_at,
                        worker_cycles.c.num_samples,
                        worker_cycles.c.metrics,
                    ).where(worker_cycles.c.cycle_id.in_([c.id for c in cycle_rows]))
                ):
                    wcs.setdefault(r.cycle_id, []).append(r)
            # only the checkpoints these cycles name: a checkpoint row holds its model, and
            # reading every row took 200 ms at 1,200 checkpoints (the demo polls this often)
            named = {i for c in cycle_rows for i in (c.checkpoint_id, c.result_checkpoint_id)}
            named.discard(None)
            ckpt_numbers = dict(
                conn.execute(
                    sa.select(checkpoints.c.id, checkpoints.c.number).where(
                        checkpoints.c.id.in_(sorted(named))
                    )
                ).all()
            ) if named else {}
            cycle_list = []
            for c in reversed(cycle_rows):
                rows = wcs.get(c.id, [])
                reported = [r for r in rows if r.reported_at is not None]
                entry = {
                    "sequence": c.sequence,
                    "status": c.status,
                    "start": c.start_at,
                    "end": c.end_at,
                    "closed_at": c.closed_at,
                    "accepted": len(rows),
                    "reported": len(reported),
                    "checkpoint": ckpt_numbers.get(c.checkpoint_id),
                    "result_checkpoint": ckpt_numbers.get(c.result_checkpoint_id),
                    "num_samples": sum(r.num_samples or 0 for r in reported),
                    "metrics": _metric_means(reported),
                }
                if c.status == "open":
                    entry["deadline_in"] = None if c.end_at is None else max(0.0, c.end_at - now)
                cycle_list.append(entry)
            out["cycles"] = cycle_list
            out["current"] = next((c for c in cycle_list if c["status"] == "open"), None)
            latest = conn.execute(q.checkpoint_listing, {"process_id": p.id, "last": last}).all()
            out["checkpoints"] = [
                {"number": r.number, "alias": "latest" if i == 0 else None,
                 "created_at": r.created_at}
                for i, r in reversed(list(enumerate(latest)))
            ]
            return out

    def checkpoint(self, name: str, version: str | None, ref: str | int = "latest") -> bytes:
        with db.read(self.engine) as conn:
            p = self._process_by_name(conn, name, version)
            stmt = sa.select(checkpoints.c.id).where(checkpoints.c.process_id == p.id)
            ref = str(ref)
            if ref.isdigit():
                stmt = stmt.where(checkpoints.c.number == int(ref))
            elif ref == "latest":  # the one alias: the highest number
                stmt = stmt.order_by(checkpoints.c.number.desc()).limit(1)
            else:
                stmt = None
            ckpt_id = None if stmt is None else conn.execute(stmt).scalar()
            if ckpt_id is None:
                raise NotFoundError(
                    f"process '{p.name}' version '{p.version}' has no checkpoint {ref!r}"
                )
            return bytes(
                conn.execute(
                    sa.select(checkpoints.c.data).where(checkpoints.c.id == ckpt_id)
                ).scalar()
            )

    def progress(self, name: str, version: str | None) -> tuple[str, int]:
        """(the process's status, the sequence of its newest closed cycle, 0 before the
        first closes): one cheap read, for status requests held until a cycle closes."""
        with db.read(self.engine) as conn:
            p = self._process_by_name(conn, name, version)
            newest = conn.execute(
                sa.select(sa.func.max(cycles.c.sequence)).where(
                    cycles.c.process_id == p.id, cycles.c.status != "open"
                )
            ).scalar()
            return p.status, newest or 0

    def stop(self, name: str, version: str | None) -> dict[str, Any]:
        with db.write(self.engine) as conn:
            p = self._process_by_name(conn, name, version)
            cycle = self._open_cycle(conn, p.id, lock=True)
            if cycle is not None:
                conn.execute(
                    cycles.update()
                    .where(cycles.c.id == cycle.id)
                    .values(status="stopped", closed_at=time.time())
                )
                conn.execute(aggregates.delete().where(aggregates.c.cycle_id == cycle.id))
            if p.status == "running":
                conn.execute(
                    processes.update().where(processes.c.id == p.id).values(status="stopped")
                )
                self._announce(conn)
        self.on_cycles_changed()  # requests held for this process answer now, not at their timeout
        return {"status": "success", "name": p.name, "version": p.version}

    def delete(self, name: str, version: str | None) -> dict[str, Any]:
        with db.write(self.engine) as conn:
            p = self._process_by_name(conn, name, version)
            cycle_ids = sa.select(cycles.c.id).where(cycles.c.process_id == p.id)
            conn.execute(aggregates.delete().where(aggregates.c.cycle_id.in_(cycle_ids)))
            conn.execute(worker_cycles.delete().where(worker_cycles.c.cycle_id.in_(cycle_ids)))
            conn.execute(cycles.delete().where(cycles.c.process_id == p.id))
            for table in (workers, checkpoints, plans, protocols):
                conn.execute(table.delete().where(table.c.process_id == p.id))
            conn.execute(processes.delete().where(processes.c.id == p.id))
        self.on_cycles_changed()
        return {"status": "success", "name": p.name, "version": p.version}


def _metric_means(reported) -> dict[str, float]:
    """Mean of each metric over the cycle's reports; num_samples-weighted if all carry it.

    Computed as a convex combination (weights normalised, values scaled by the largest)
    with ``math.fsum``, then kept within the values' range: the mean of finite values is
    finite, however large the values and weights (1e300 weighted by 2**53 - 1 overflowed a
    plain weighted sum to inf, which no status reply could carry as JSON).
    """
    weighted = bool(reported) and all(r.num_samples for r in reported)
    values: dict[str, list[tuple[float, float]]] = {}
    for r in reported:
        w = r.num_samples if weighted else 1
        for k, v in (r.metrics or {}).items():
            values.setdefault(k, []).append((w, v))
    means = {}
    for k, pairs in values.items():
        total = sum(w for w, _ in pairs)  # integers: exact
        lo, hi = min(v for _, v in pairs), max(v for _, v in pairs)
        scale = max(abs(lo), abs(hi)) or 1.0
        mean = scale * math.fsum((v / scale) * (w / total) for w, v in pairs)  # inf: clipped
        means[k] = min(max(mean, lo), hi)
    return means
