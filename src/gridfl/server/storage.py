"""All of the node's SQL: prebuilt statements for the worker hot path, and functions that
run the rest and return rows (or scalars). No rules live here: callers decide.

Hot path. Building a SQLAlchemy statement per call costs about four times its execution on
SQLite (clause construction and cache-key generation: ~220 us against ~55 us for a
prebuilt statement with bound parameters), and every worker runs these several times a
cycle. Each is also shaped to answer its question in one round trip where the old sequence
of lookups took three to five. The statements every report runs go further: they run on
the driver's cursor (:class:`~gridfl.server.db.Prepared`), behind the functions that name
them. The error paths keep step-by-step queries (the functions below): they run rarely,
and their order, chosen by the caller, decides which error a client sees.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection, CursorResult

from gridfl._messages import PLAN_VARIANTS
from gridfl.server.db import Prepared
from gridfl.server.tables import (
    aggregates,
    checkpoints,
    cycle_diffs,
    cycle_partials,
    cycles,
    evaluation_seats,
    evaluations,
    plans,
    processes,
    protocols,
    strategy_states,
    worker_cycles,
    workers,
)

_P = sa.bindparam

_seat = worker_cycles.alias("seat")
_mine = worker_cycles.alias("mine")

#: A worker, its process's status, and the process's open cycle (if any) with how many
#: workers it accepted and whether this worker is one of them: everything a long-polled
#: request for a full cycle needs, in one read.
admission = (
    sa.select(
        workers.c.process_id,
        processes.c.status.label("process_status"),
        cycles.c.id.label("cycle_id"),
        cycles.c.end_at,
        sa.select(sa.func.count())
        .select_from(_seat)
        .where(_seat.c.cycle_id == cycles.c.id)
        .scalar_subquery()
        .label("accepted"),
        sa.select(_mine.c.id)
        .where(_mine.c.cycle_id == cycles.c.id, _mine.c.worker_id == workers.c.id)
        .scalar_subquery()
        .label("taken"),
    )
    .select_from(
        workers.join(processes, processes.c.id == workers.c.process_id).outerjoin(
            cycles, sa.and_(cycles.c.process_id == workers.c.process_id, cycles.c.status == "open")
        )
    )
    .where(workers.c.id == _P("worker_id"))
)

#: A worker with its process's status.
worker_process = (
    sa.select(workers.c.id, workers.c.identity, workers.c.process_id, processes.c.status)
    .select_from(workers.join(processes, processes.c.id == workers.c.process_id))
    .where(workers.c.id == _P("worker_id"))
)

#: The open cycle of a process, row-locked (PostgreSQL; SQLite's BEGIN IMMEDIATE already
#: serialises writers). Counts are read in a later statement on purpose: under READ
#: COMMITTED only a statement that starts after the lock is granted sees the accepts
#: committed by whoever held it.
open_cycle_locked = (
    sa.select(cycles)
    .where(cycles.c.process_id == _P("process_id"), cycles.c.status == "open")
    .with_for_update()
)

#: How many workers a cycle accepted, and this worker's seat in it (``None`` if none).
seats = sa.select(
    sa.select(sa.func.count())
    .select_from(worker_cycles)
    .where(worker_cycles.c.cycle_id == _P("cycle_id"))
    .scalar_subquery()
    .label("accepted"),
    sa.select(worker_cycles.c.id)
    .where(worker_cycles.c.cycle_id == _P("cycle_id"), worker_cycles.c.worker_id == _P("worker_id"))
    .scalar_subquery()
    .label("taken"),
)

#: Writes: the WHERE parameters carry a ``b_`` prefix, the SET values are passed by
#: column name (SQLAlchemy reserves column names for those).
accept = worker_cycles.insert()

#: The open cycle of a process and the request key this worker holds in it (``None``
#: when it holds none): the access check of every download, in one read.
asset_access = (
    sa.select(cycles.c.id, cycles.c.checkpoint_id, worker_cycles.c.request_key)
    .select_from(
        cycles.outerjoin(
            worker_cycles,
            sa.and_(
                worker_cycles.c.cycle_id == cycles.c.id,
                worker_cycles.c.worker_id == _P("worker_id"),
            ),
        )
    )
    .where(cycles.c.process_id == _P("process_id"), cycles.c.status == "open")
)

plan_meta = sa.select(
    plans.c.id,
    plans.c.name,
    plans.c.process_id,
    *[(plans.c[v] != sa.null()).label(f"has_{v}") for v in PLAN_VARIANTS],
).where(plans.c.id == _P("plan_id"), plans.c.is_averaging.is_(False))

#: Everything about a process that never changes after hosting (status aside).
process_row = sa.select(processes).where(processes.c.id == _P("process_id"))
process_plans = sa.select(plans.c.id, plans.c.name, plans.c.is_averaging).where(
    plans.c.process_id == _P("process_id")
)
#: The ONNX bytes of a process's worker plans (hashed once, for the accepted reply).
process_plan_bytes = sa.select(plans.c.name, plans.c.onnx).where(
    plans.c.process_id == _P("process_id"), plans.c.is_averaging.is_(False)
)
process_protocols = sa.select(protocols.c.id, protocols.c.name).where(
    protocols.c.process_id == _P("process_id")
)

#: The seats a worker held, newest first, with their cycles (a report names one by its key).
_seats_of_worker = (
    sa.select(
        worker_cycles.c.id,
        worker_cycles.c.request_key,
        worker_cycles.c.reported_at,
        cycles.c.id.label("cycle_id"),
        cycles.c.process_id,
        cycles.c.sequence,
        cycles.c.status,
        cycles.c.checkpoint_id,
    )
    .select_from(worker_cycles.join(cycles, worker_cycles.c.cycle_id == cycles.c.id))
    .where(worker_cycles.c.worker_id == _P("worker_id"))
    .order_by(worker_cycles.c.id.desc())
)
_worker_seats = Prepared(_seats_of_worker)
_newest_seats = Prepared(_seats_of_worker.limit(_P("last")))
_cycle_locked = Prepared(sa.select(cycles).where(cycles.c.id == _P("cycle_id")).with_for_update())
_seat_reported = Prepared(
    sa.select(worker_cycles.c.reported_at).where(worker_cycles.c.id == _P("seat_id"))
)
_count_seats = Prepared(
    sa.select(sa.func.count().label("seats"))
    .select_from(worker_cycles)
    .where(worker_cycles.c.cycle_id == _P("cycle_id"))
)
_mark_reported = Prepared(
    worker_cycles.update()
    .where(worker_cycles.c.id == _P("b_seat_id"))
    .values(reported_at=_P("reported_at"), num_samples=_P("num_samples"), metrics=_P("metrics"))
)
_count_report = Prepared(
    cycles.update().where(cycles.c.id == _P("b_cycle_id")).values(num_reports=_P("num_reports"))
)


def worker_seats(conn: Connection, worker_id: str, last: int | None = None) -> list:
    """The worker's ``last`` seats (all when ``None``), newest first, with their cycles: id,
    request_key, reported_at, cycle_id, process_id, sequence, status, checkpoint_id."""
    if last is None:
        return _worker_seats.all(conn, {"worker_id": worker_id})
    return _newest_seats.all(conn, {"worker_id": worker_id, "last": last})


def lock_cycle(conn: Connection, cycle_id: int):
    """The cycle's row, locked for the rest of the transaction (PostgreSQL ``FOR UPDATE``;
    SQLite's write transaction holds the whole database); ``None`` once it is deleted."""
    return _cycle_locked.first(conn, {"cycle_id": cycle_id})


def seat_reported_at(conn: Connection, seat_id: int) -> float | None:
    """When the seat reported (``None``: not yet). Read after the cycle's row is locked."""
    row = _seat_reported.first(conn, {"seat_id": seat_id})
    return None if row is None else row.reported_at


def count_seats(conn: Connection, cycle_id: int) -> int:
    """How many seats the cycle accepted: a scan of its seats, so asked only when a
    completion rule depends on it."""
    return int(_count_seats.first(conn, {"cycle_id": cycle_id}).seats)


def mark_reported(
    conn: Connection,
    seat_id: int,
    reported_at: float,
    num_samples: int | None = None,
    metrics: dict | None = None,
) -> None:
    """The seat has reported (with what the report said of itself)."""
    _mark_reported.run(
        conn,
        {
            "b_seat_id": seat_id,
            "reported_at": reported_at,
            "num_samples": num_samples,
            "metrics": None if metrics is None else json.dumps(metrics),
        },
    )


def count_report(conn: Connection, cycle_id: int, num_reports: int) -> None:
    """The cycle (locked) now has ``num_reports`` reports."""
    _count_report.run(conn, {"b_cycle_id": cycle_id, "num_reports": num_reports})


aggregate_counts = (
    sa.select(aggregates.c.version, aggregates.c.count_w, aggregates.c.count_x, aggregates.c.weight)
    .where(aggregates.c.cycle_id == _P("cycle_id"))
    .with_for_update()
)
aggregate_sums = sa.select(aggregates.c.sum_w, aggregates.c.sum_x).where(
    aggregates.c.cycle_id == _P("cycle_id")
)
store_sums = aggregates.update().where(aggregates.c.cycle_id == _P("b_cycle_id"))

#: The newest ``last`` checkpoints of a process for the admin status (which a dashboard
#: or the demo polls several times a second), read from ``ix_checkpoints_listing`` alone.
checkpoint_listing = (
    sa.select(checkpoints.c.number, checkpoints.c.created_at)
    .where(checkpoints.c.process_id == _P("process_id"))
    .order_by(checkpoints.c.number.desc())
    .limit(_P("last"))
)


# ---------------------------------------------------------------- processes and assets
def process_by_name(conn: Connection, name: str, version: str | None):
    """The newest process named ``name`` (and ``version``, if given), or ``None``."""
    stmt = sa.select(processes).where(processes.c.name == name)
    if version is not None:
        stmt = stmt.where(processes.c.version == version)
    return conn.execute(stmt.order_by(processes.c.id.desc()).limit(1)).first()


def process_by_id(conn: Connection, process_id: int):
    return conn.execute(sa.select(processes).where(processes.c.id == process_id)).first()


def process_id_exists(conn: Connection, process_id: int) -> bool:
    return (
        conn.execute(sa.select(processes.c.id).where(processes.c.id == process_id)).first()
        is not None
    )


def process_exists(conn: Connection, name: str, version: str) -> bool:
    return (
        conn.execute(
            sa.select(processes.c.id).where(
                processes.c.name == name, processes.c.version == version
            )
        ).first()
        is not None
    )


def _new_id(result: CursorResult) -> int:
    """The primary key an INSERT of one row made."""
    key = result.inserted_primary_key
    assert key is not None  # always set for a single-row INSERT
    return int(key[0])


def all_processes(conn: Connection):
    return conn.execute(sa.select(processes).order_by(processes.c.id)).all()


def insert_process(conn: Connection, **values) -> int:
    return _new_id(conn.execute(processes.insert().values(**values)))


def insert_plan(conn: Connection, process_id: int, row: dict) -> int:
    return _new_id(conn.execute(plans.insert().values(process_id=process_id, **row)))


def insert_protocol(conn: Connection, process_id: int, row: dict) -> int:
    return _new_id(conn.execute(protocols.insert().values(process_id=process_id, **row)))


def set_process_status(conn: Connection, process_id: int, status: str) -> None:
    conn.execute(processes.update().where(processes.c.id == process_id).values(status=status))


def plan_variant(conn: Connection, plan_id: int, variant: str):
    """One variant's bytes of a plan (``onnx`` for an averaging plan)."""
    return conn.execute(sa.select(plans.c[variant]).where(plans.c.id == plan_id)).scalar()


def protocol_row(conn: Connection, protocol_id: int):
    return conn.execute(
        sa.select(protocols.c.process_id, protocols.c.data).where(protocols.c.id == protocol_id)
    ).first()


def delete_process(conn: Connection, process_id: int) -> None:
    """The process and everything it owns."""
    cycle_ids = sa.select(cycles.c.id).where(cycles.c.process_id == process_id)
    conn.execute(aggregates.delete().where(aggregates.c.cycle_id.in_(cycle_ids)))
    conn.execute(cycle_diffs.delete().where(cycle_diffs.c.cycle_id.in_(cycle_ids)))
    conn.execute(strategy_states.delete().where(strategy_states.c.process_id == process_id))
    conn.execute(worker_cycles.delete().where(worker_cycles.c.cycle_id.in_(cycle_ids)))
    conn.execute(cycles.delete().where(cycles.c.process_id == process_id))
    evaluated = sa.select(evaluations.c.id).where(evaluations.c.process_id == process_id)
    conn.execute(evaluation_seats.delete().where(evaluation_seats.c.evaluation_id.in_(evaluated)))
    conn.execute(evaluations.delete().where(evaluations.c.process_id == process_id))
    for table in (workers, checkpoints, plans, protocols):
        conn.execute(table.delete().where(table.c.process_id == process_id))
    conn.execute(processes.delete().where(processes.c.id == process_id))


# ---------------------------------------------------------------- workers
def insert_worker(conn: Connection, **values) -> None:
    conn.execute(workers.insert().values(**values))


def worker_exists(conn: Connection, worker_id: str) -> bool:
    return (
        conn.execute(sa.select(workers.c.id).where(workers.c.id == worker_id)).first() is not None
    )


def worker_row(conn: Connection, worker_id: str):
    return conn.execute(
        sa.select(workers.c.id, workers.c.process_id).where(workers.c.id == worker_id)
    ).first()


def store_speeds(conn: Connection, worker_id: str, ping, download, upload) -> None:
    conn.execute(
        workers.update()
        .where(workers.c.id == worker_id)
        .values(ping=ping, download=download, upload=upload)
    )


def last_cycle_joined(conn: Connection, identity: str, process_id: int) -> int | None:
    """The sequence of the newest cycle of the process that accepted this identity."""
    return conn.execute(
        sa.select(sa.func.max(cycles.c.sequence))
        .select_from(worker_cycles.join(cycles, worker_cycles.c.cycle_id == cycles.c.id))
        .where(worker_cycles.c.identity == identity, cycles.c.process_id == process_id)
    ).scalar()


# ---------------------------------------------------------------- cycles
def open_cycle(conn: Connection, process_id: int, *, lock: bool = False):
    stmt = sa.select(cycles).where(cycles.c.process_id == process_id, cycles.c.status == "open")
    if lock:
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def open_cycles_with_reports(conn: Connection):
    """The open cycles that committed at least one report (all processes)."""
    return conn.execute(
        sa.select(cycles).where(cycles.c.status == "open", cycles.c.num_reports > 0)
    ).all()


def insert_cycle(conn: Connection, process_id: int, **values) -> int:
    """A new cycle numbered after the process's last one."""
    seq = conn.execute(
        sa.select(sa.func.coalesce(sa.func.max(cycles.c.sequence), 0)).where(
            cycles.c.process_id == process_id
        )
    ).scalar_one()
    return _new_id(
        conn.execute(cycles.insert().values(process_id=process_id, sequence=seq + 1, **values))
    )


def notify(conn: Connection, channel: str, payload: str) -> None:
    """PostgreSQL NOTIFY, delivered when (and only if) the transaction commits."""
    conn.execute(sa.select(sa.func.pg_notify(channel, payload)))


def close_cycle(conn: Connection, cycle_id: int, **values) -> None:
    """Set the cycle's closing ``status`` (and ``closed_at``...) and drop its aggregate
    (sums, kept diffs, and the server processes' partial sums)."""
    conn.execute(cycles.update().where(cycles.c.id == cycle_id).values(**values))
    for table in (aggregates, cycle_diffs, cycle_partials):
        conn.execute(table.delete().where(table.c.cycle_id == cycle_id))


def count_completed(conn: Connection, process_id: int) -> int:
    return conn.execute(
        sa.select(sa.func.count())
        .select_from(cycles)
        .where(cycles.c.process_id == process_id, cycles.c.status == "completed")
    ).scalar_one()


def next_deadline(conn: Connection) -> float | None:
    return conn.execute(
        sa.select(sa.func.min(cycles.c.end_at)).where(
            cycles.c.status == "open", cycles.c.end_at.is_not(None)
        )
    ).scalar()


def cycle_marker(conn: Connection) -> tuple[int | None, int, int]:
    row = conn.execute(
        sa.select(sa.func.max(cycles.c.id), sa.func.count(), sa.func.count(cycles.c.closing_at))
        .where(cycles.c.status == "open")
    ).one()
    return row[0], row[1], row[2]


def due_cycles(conn: Connection, now: float) -> list[int]:
    return list(
        conn.execute(
            sa.select(cycles.c.id).where(cycles.c.status == "open", cycles.c.end_at <= now)
        )
        .scalars()
        .all()
    )


def newest_closed_sequence(conn: Connection, process_id: int) -> int | None:
    return conn.execute(
        sa.select(sa.func.max(cycles.c.sequence)).where(
            cycles.c.process_id == process_id, cycles.c.status != "open"
        )
    ).scalar()


def recent_cycles(conn: Connection, process_id: int, last: int):
    return conn.execute(
        sa.select(cycles)
        .where(cycles.c.process_id == process_id)
        .order_by(cycles.c.sequence.desc())
        .limit(last)
    ).all()


def seats_of(conn: Connection, cycle_ids: list[int]):
    """The seats of these cycles: cycle_id, reported_at, num_samples, metrics."""
    return conn.execute(
        sa.select(
            worker_cycles.c.cycle_id,
            worker_cycles.c.reported_at,
            worker_cycles.c.num_samples,
            worker_cycles.c.metrics,
        ).where(worker_cycles.c.cycle_id.in_(cycle_ids))
    )


# ---------------------------------------------------------------- aggregates
def insert_aggregate(conn: Connection, cycle_id: int) -> None:
    conn.execute(aggregates.insert().values(cycle_id=cycle_id, version=0))


# ---------------------------------------------------------------- checkpoints
def checkpoint_data(conn: Connection, checkpoint_id: int):
    return conn.execute(
        sa.select(checkpoints.c.data).where(checkpoints.c.id == checkpoint_id)
    ).scalar_one()


def latest_checkpoint_number(conn: Connection, process_id: int) -> int:
    """The process's highest checkpoint number (every hosted process has checkpoint 1)."""
    return conn.execute(
        sa.select(sa.func.max(checkpoints.c.number)).where(checkpoints.c.process_id == process_id)
    ).scalar_one()


def insert_checkpoint(conn: Connection, process_id: int, number: int, data, now: float) -> int:
    return _new_id(
        conn.execute(
            checkpoints.insert().values(
                process_id=process_id, number=number, data=data, created_at=now
            )
        )
    )


def checkpoint_numbers(conn: Connection, checkpoint_ids: set[int]) -> dict[int, int]:
    """checkpoint id -> number, reading only these rows (a row holds its whole model)."""
    return dict(
        conn.execute(
            sa.select(checkpoints.c.id, checkpoints.c.number).where(
                checkpoints.c.id.in_(sorted(checkpoint_ids))
            )
        ).all()
    )


def checkpoint_id(conn: Connection, process_id: int, ref: str) -> int | None:
    """The id of checkpoint number ``ref``, or of the highest number for ``"latest"``."""
    stmt = sa.select(checkpoints.c.id).where(checkpoints.c.process_id == process_id)
    if ref.isdigit():
        stmt = stmt.where(checkpoints.c.number == int(ref))
    elif ref == "latest":  # the one alias: the highest number
        stmt = stmt.order_by(checkpoints.c.number.desc()).limit(1)
    else:
        return None
    return conn.execute(stmt).scalar()


# ---------------------------------------------------------------- dashboard
def workers_of(conn: Connection, process_id: int, last: int):
    """The process's ``last`` newest workers: id, created_at and speed-test figures."""
    return conn.execute(
        sa.select(workers.c.id, workers.c.created_at, workers.c.ping, workers.c.download,
                  workers.c.upload)
        .where(workers.c.process_id == process_id)
        .order_by(workers.c.created_at.desc())
        .limit(last)
    ).all()


def node_listeners(conn: Connection):
    """PostgreSQL only: the sessions on this database LISTENing for cycle news, one per
    running server process (pid, client address, since when)."""
    return conn.execute(
        sa.text(
            "SELECT pid, client_addr::text AS client_addr, backend_start FROM pg_stat_activity"
            " WHERE datname = current_database() AND query ILIKE 'LISTEN %'"
            " ORDER BY backend_start"
        )
    ).all()
