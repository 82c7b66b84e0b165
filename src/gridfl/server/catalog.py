"""Read-through caches of what never changes once written: checkpoints, a hosted process's
configs and asset ids, plans. Ids are never reused (AUTOINCREMENT / sequences), so an entry
cached by id stays true; a process's status does change, and is always read."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from gridfl.server import aggregate as agg
from gridfl.server import evaluation, privacy, storage, strategies
from gridfl.server.dp_config import DPConfig


class LRU:
    """A small thread-safe least-recently-used map."""

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
class ProcessInfo:
    """What never changes about a hosted process (its status does, and is always read)."""

    id: int
    name: str
    version: str
    client_config: dict
    server_config: dict
    plan_ids: dict[str, int]
    protocol_ids: dict[str, int]
    averaging_plan_id: int | None
    plan_digests: dict[str, str]  # SHA-256 of each training-side plan's onnx variant
    evaluation_plans: frozenset[str] = frozenset()  # names of plans of kind "evaluation"


class Catalog:
    """The caches of one node process; every method reads through ``conn`` on a miss."""

    def __init__(self) -> None:
        # checkpoint id -> (bytes, params, spec): the open cycle's and the one before
        self._checkpoints = LRU(2)
        self._plans = LRU(64)  # (plan id, variant) -> bytes
        self._averaging_plans = LRU(8)  # plan id -> Plan
        self._processes = LRU(64)  # process id -> ProcessInfo
        self._plan_meta = LRU(64)  # plan id -> its row in storage.plan_meta
        self._strategies = LRU(64)  # process id -> (inner Strategy, DPConfig or None)

    def checkpoint(self, conn: Connection, checkpoint_id: int):
        """``(bytes, params, ModelSpec)`` of a checkpoint."""
        hit = self._checkpoints.get(checkpoint_id)
        if hit is not None:
            return hit
        from gridfl import state

        data = bytes(storage.checkpoint_data(conn, checkpoint_id))
        params = state.loads(data)
        value = (data, params, agg.ModelSpec.of(params))
        self._checkpoints.put(checkpoint_id, value)
        return value

    def remember_checkpoint(self, checkpoint_id: int, data: bytes, params, spec) -> None:
        """A checkpoint just written: the next cycle trains it."""
        self._checkpoints.put(checkpoint_id, (data, params, spec))

    def process(self, conn: Connection, process_id: int) -> ProcessInfo:
        info = self._processes.get(process_id)
        if info is None:
            row = conn.execute(storage.process_row, {"process_id": process_id}).one()
            plan_rows = conn.execute(storage.process_plans, {"process_id": process_id}).all()
            onnx = {
                r.name: bytes(r.onnx)
                for r in conn.execute(storage.process_plan_bytes, {"process_id": process_id})
                if r.onnx is not None
            }
            info = ProcessInfo(
                id=row.id,
                name=row.name,
                version=row.version,
                client_config=row.client_config,
                server_config=row.server_config,
                plan_ids={r.name: r.id for r in plan_rows if not r.is_averaging},
                protocol_ids={
                    r.name: r.id
                    for r in conn.execute(storage.process_protocols, {"process_id": process_id})
                },
                averaging_plan_id=next((r.id for r in plan_rows if r.is_averaging), None),
                plan_digests={n: hashlib.sha256(b).hexdigest() for n, b in onnx.items()},
                evaluation_plans=frozenset(
                    n for n, b in onnx.items() if evaluation.plan_kind(b) == "evaluation"
                ),
            )
            self._processes.put(process_id, info)
        return info

    def averaging_plan(self, conn: Connection, process_id: int):
        """The process's hosted averaging plan, loaded, or ``None``."""
        plan_id = self.process(conn, process_id).averaging_plan_id
        if plan_id is None:
            return None
        plan = self._averaging_plans.get(plan_id)
        if plan is None:
            from gridfl.plan import Plan

            plan = Plan.from_bytes(bytes(storage.plan_variant(conn, plan_id, "onnx")), threads=1)
            self._averaging_plans.put(plan_id, plan)
        return plan

    def strategy(self, conn: Connection, process_id: int) -> agg.Strategy:
        """How the process aggregates (:func:`strategies.strategy_for`), inside differential
        privacy when it was hosted with it (:func:`gridfl.server.privacy.wrap`)."""
        built = self._strategies.get(process_id)
        if built is None:  # configs never change once hosted: built once per process
            info = self.process(conn, process_id)
            inner = strategies.strategy_for(
                info.server_config.get("strategy"), self.averaging_plan(conn, process_id)
            )
            built = (inner, DPConfig.of(info.server_config))
            self._strategies.put(process_id, built)
        inner, dp = built
        # only DP's per-cycle state needs the transaction's connection
        return inner if dp is None else privacy.PrivateAggregation(inner, dp, conn, process_id)

    def plan_meta(self, conn: Connection, plan_id: int):
        """A worker plan's row in ``storage.plan_meta`` (its variants), or ``None``."""
        row = self._plan_meta.get(plan_id)
        if row is None:
            row = conn.execute(storage.plan_meta, {"plan_id": plan_id}).first()
            if row is not None:
                self._plan_meta.put(plan_id, row)
        return row

    def forget_plan_meta(self, plan_id: int) -> None:
        self._plan_meta.pop(plan_id)

    def plan_bytes(self, conn: Connection, plan_id: int, variant: str) -> bytes:
        hit = self._plans.get((plan_id, variant))
        if hit is None:
            hit = bytes(storage.plan_variant(conn, plan_id, variant))
            self._plans.put((plan_id, variant), hit)
        return hit
