"""The admin API's queries and actions on hosted processes: list, status (with each cycle's
mean metrics), checkpoint download, progress, stop and delete."""

from __future__ import annotations

import math
import time
from typing import Any

from sqlalchemy.engine import Connection, Engine

from gridfl._exceptions import NotFoundError
from gridfl.server import db, evaluation, privacy, storage, strategies, strategy_store
from gridfl.server.cycles import Cycles


def process_named(conn: Connection, name: str, version: str | None):
    """The newest process named ``name`` (and ``version``, if given); NotFoundError if none."""
    row = storage.process_by_name(conn, name, version)
    if row is None:
        v = f" version '{version}'" if version is not None else ""
        raise NotFoundError(f"no FL process named '{name}'{v} is hosted here")
    return row


def list_processes(engine: Engine) -> list[dict[str, Any]]:
    with db.read(engine) as conn:
        return [_summary(conn, p) for p in storage.all_processes(conn)]


def _summary(conn: Connection, p) -> dict[str, Any]:
    cycle = storage.open_cycle(conn, p.id)
    return {
        "id": p.id,
        "name": p.name,
        "version": p.version,
        "status": p.status,
        "created_at": p.created_at,
        "current_cycle": cycle.sequence if cycle else None,
        "latest_checkpoint": storage.latest_checkpoint_number(conn, p.id),
    }


def status(engine: Engine, name: str, version: str | None, *, last: int = 100) -> dict[str, Any]:
    """Configs, the ``last`` cycles (with their workers' counts and mean metrics) and
    as many of the latest checkpoints."""
    with db.read(engine) as conn:
        p = process_named(conn, name, version)
        out = _summary(conn, p)
        cfg = dict(p.server_config)
        if cfg.get("authentication"):
            cfg["authentication"] = {
                k: ("***" if k == "secret" else v) for k, v in cfg["authentication"].items()
            }
        out["server_config"] = cfg
        out["client_config"] = p.client_config
        out["strategy"] = _strategy(conn, p)
        now = time.time()
        cycle_rows = storage.recent_cycles(conn, p.id, last)
        wcs: dict[int, list] = {}
        if cycle_rows:
            for r in storage.seats_of(conn, [c.id for c in cycle_rows]):
                wcs.setdefault(r.cycle_id, []).append(r)
        # only the checkpoints these cycles name: a checkpoint row holds its model, and
        # reading every row took 200 ms at 1,200 checkpoints (the demo polls this often)
        named = {i for c in cycle_rows for i in (c.checkpoint_id, c.result_checkpoint_id)}
        named.discard(None)
        ckpt_numbers = storage.checkpoint_numbers(conn, named) if named else {}
        cycle_list = []
        # async: a buffer's reports come from seats of any recent buffer (its num_reports)
        buffered = cfg.get("mode") == "async"
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
                "reported": c.num_reports if buffered else len(reported),
                "rejected": c.num_rejected,
                "checkpoint": ckpt_numbers.get(c.checkpoint_id),
                "result_checkpoint": ckpt_numbers.get(c.result_checkpoint_id),
                "num_samples": sum(r.num_samples or 0 for r in reported),
                "metrics": metric_means(reported),
            }
            if c.status == "open":
                entry["deadline_in"] = None if c.end_at is None else max(0.0, c.end_at - now)
                # ready and gathering the server processes' partial sums: seats no one,
                # takes no report (still "open": watchers read any other status as closed)
                entry["closing"] = c.closing_at is not None
            cycle_list.append(entry)
        out["cycles"] = cycle_list
        out["current"] = next((c for c in cycle_list if c["status"] == "open"), None)
        latest = conn.execute(
            storage.checkpoint_listing, {"process_id": p.id, "last": last}
        ).all()
        out["checkpoints"] = [
            {"number": r.number, "alias": "latest" if i == 0 else None, "created_at": r.created_at}
            for i, r in reversed(list(enumerate(latest)))
        ]
        if cfg.get("evaluation") is not None:
            out["evaluations"] = evaluation.summaries(conn, p.id, last, metric_means)
        privacy.annotate_status(conn, p, out)
        return out


def _strategy(conn: Connection, p) -> dict[str, Any]:
    """The process's aggregation rule, its hyperparameters, and its state's summary (the
    step count and moment norms of a server optimizer)."""
    cfg = p.server_config.get("strategy")
    if cfg is None:
        iterative = p.server_config.get("iterative_plan")
        return {"name": "iterative_averaging" if iterative else "fedavg", "state": {}}
    summary = strategy_store.latest_summary(conn, p.id)
    params = {k: v for k, v in cfg.items() if k != "name"}
    if summary is None:
        summary = {"step": 0} if cfg["name"] in strategies.OPTIMIZERS else {}
    return {"name": cfg["name"], "params": params, "state": summary}


def metric_means(reported) -> dict[str, float]:
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


def checkpoint(engine: Engine, name: str, version: str | None, ref: str | int = "latest") -> bytes:
    """A checkpoint's bytes, by number or ``"latest"``."""
    with db.read(engine) as conn:
        p = process_named(conn, name, version)
        ref = str(ref)
        ckpt_id = storage.checkpoint_id(conn, p.id, ref)
        if ckpt_id is None:
            raise NotFoundError(
                f"process '{p.name}' version '{p.version}' has no checkpoint {ref!r}"
            )
        return bytes(storage.checkpoint_data(conn, ckpt_id))


def progress(engine: Engine, name: str, version: str | None) -> tuple[str, int]:
    """(the process's status, the sequence of its newest closed cycle, 0 before the
    first closes): one cheap read, for status requests held until a cycle closes."""
    with db.read(engine) as conn:
        p = process_named(conn, name, version)
        return p.status, storage.newest_closed_sequence(conn, p.id) or 0


def stop(engine: Engine, cycles: Cycles, name: str, version: str | None) -> dict[str, Any]:
    """Stop the process: its open cycle closes as ``stopped``, its reports dropped."""
    with db.write(engine) as conn:
        p = process_named(conn, name, version)
        cycle = storage.open_cycle(conn, p.id, lock=True)
        if cycle is not None:
            storage.close_cycle(conn, cycle.id, status="stopped", closed_at=time.time())
            cycles.drop_live(cycle.id)
        if p.status == "running":
            storage.set_process_status(conn, p.id, "stopped")
            cycles.announce(conn)
    return {"status": "success", "name": p.name, "version": p.version}


def delete(engine: Engine, name: str, version: str | None) -> dict[str, Any]:
    """Delete the process and everything it owns."""
    with db.write(engine) as conn:
        p = process_named(conn, name, version)
        storage.delete_process(conn, p.id)
    return {"status": "success", "name": p.name, "version": p.version}


def overview(engine: Engine) -> list[dict[str, Any]]:
    """Each process's summary plus what a list of them shows: the reports of its newest
    cycle, its strategy's name, the ε spent when it trains with DP and its last activity."""
    with db.read(engine) as conn:
        out = []
        for p in storage.all_processes(conn):
            entry = _summary(conn, p)
            cycle_rows = storage.recent_cycles(conn, p.id, 2)
            seats = storage.seats_of(conn, [c.id for c in cycle_rows]).all() if cycle_rows else []
            newest = cycle_rows[0] if cycle_rows else None
            reported = [s for s in seats if newest and s.cycle_id == newest.id and s.reported_at]
            times = [p.created_at, *(s.reported_at or 0 for s in seats)]
            times += [t or 0 for c in cycle_rows for t in (c.start_at, c.closed_at)]
            dp = privacy.status(conn, p)
            entry.update(
                reports=len(reported),
                strategy=_strategy(conn, p)["name"],
                epsilon=None if dp is None else dp["epsilon"],
                last_activity=max(times),
            )
            out.append(entry)
        return out


def workers_seen(engine: Engine, name: str, version: str | None, last: int = 200) -> list[dict]:
    """The process's newest workers with their speed-test figures (None: not measured)."""
    with db.read(engine) as conn:
        p = process_named(conn, name, version)
        return [
            {"worker_id": r.id, "created_at": r.created_at, "ping": r.ping,
             "download": r.download, "upload": r.upload}
            for r in storage.workers_of(conn, p.id, last)
        ]


def database_info(engine: Engine) -> dict[str, Any]:
    """The database's kind, whether it answers (and how fast) and, on PostgreSQL, the
    server processes listening on it."""
    import sqlalchemy as sa

    kind = engine.dialect.name
    info: dict[str, Any] = {"kind": kind, "healthy": False, "latency_ms": None,
                            "server_processes": None, "error": None}
    started = time.perf_counter()
    try:
        with db.read(engine) as conn:
            conn.execute(sa.text("SELECT 1")).scalar()
            info["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            info["healthy"] = True
            if kind == "postgresql":
                info["server_processes"] = [
                    {"pid": r.pid, "client_addr": r.client_addr,
                     "since": r.backend_start.timestamp()}
                    for r in storage.node_listeners(conn)
                ]
    except sa.exc.SQLAlchemyError as e:
        info["error"] = str(e).splitlines()[0][:300]
    return info
