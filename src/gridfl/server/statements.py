"""The SQL of the worker hot path (cycle request, downloads, report), built once.

Building a SQLAlchemy statement per call costs about four times its execution on SQLite
(clause construction and cache-key generation: ~220 us against ~55 us for a prebuilt
statement with bound parameters), and every worker runs these several times a cycle.
Each is also shaped to answer its question in one round trip where the old sequence of
lookups took three to five. The error paths keep their own step-by-step queries in
``service.py``: they run rarely, and their order decides which error a client sees.
"""

from __future__ import annotations

import sqlalchemy as sa

from gridfl._wire import PLAN_VARIANTS
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

#: Every seat a worker ever held, with its cycle (a report names one by its key).
worker_seats = (
    sa.select(
        worker_cycles.c.id,
        worker_cycles.c.request_key,
        worker_cycles.c.reported_at,
        cycles.c.id.label("cycle_id"),
        cycles.c.sequence,
        cycles.c.status,
        cycles.c.checkpoint_id,
    )
    .select_from(worker_cycles.join(cycles, worker_cycles.c.cycle_id == cycles.c.id))
    .where(worker_cycles.c.worker_id == _P("worker_id"))
)

cycle_locked = sa.select(cycles).where(cycles.c.id == _P("cycle_id")).with_for_update()

#: Inside the report transaction, after the cycle row is locked: has this seat reported,
#: and how many seats does the cycle have.
report_check = sa.select(
    sa.select(worker_cycles.c.reported_at)
    .where(worker_cycles.c.id == _P("seat_id"))
    .scalar_subquery()
    .label("reported_at"),
    sa.select(sa.func.count())
    .select_from(worker_cycles)
    .where(worker_cycles.c.cycle_id == _P("cycle_id"))
    .scalar_subquery()
    .label("accepted"),
)

aggregate_counts = (
    sa.select(aggregates.c.version, aggregates.c.count_w, aggregates.c.count_x, aggregates.c.weight)
    .where(aggregates.c.cycle_id == _P("cycle_id"))
    .with_for_update()
)
aggregate_sums = sa.select(aggregates.c.sum_w, aggregates.c.sum_x).where(
    aggregates.c.cycle_id == _P("cycle_id")
)
store_sums = aggregates.update().where(aggregates.c.cycle_id == _P("b_cycle_id"))
mark_reported = worker_cycles.update().where(worker_cycles.c.id == _P("b_seat_id"))
count_report = cycles.update().where(cycles.c.id == _P("b_cycle_id"))

#: The newest ``last`` checkpoints of a process for the admin status (which a dashboard
#: or the demo polls several times a second), read from ``ix_checkpoints_listing`` alone.
checkpoint_listing = (
    sa.select(checkpoints.c.number, checkpoints.c.created_at)
    .where(checkpoints.c.process_id == _P("process_id"))
    .order_by(checkpoints.c.number.desc())
    .limit(_P("last"))
)
