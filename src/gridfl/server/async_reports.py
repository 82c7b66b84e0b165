"""The database side of ``mode: "async"`` (FedBuff, :mod:`gridfl.server.fedbuff`): each
buffer is a cycle row that stays open until ``buffer_size`` reports arrived; a seat (its
request key) outlives its cycle, and its report folds into whichever buffer is open then,
weighted by its staleness.

A report is folded, counted and (on the ``buffer_size``-th) published in one transaction
holding the open buffer's row lock, as a synchronous report is: a crash before the commit
leaves nothing of it, the seat's ``reported_at`` refuses it a second time, and on
PostgreSQL the lock makes several server processes publish each buffer once.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gridfl import _messages
from gridfl._exceptions import ConflictError
from gridfl.server import aggregate as agg
from gridfl.server import db, fedbuff, storage
from gridfl.server.catalog import Catalog
from gridfl.server.cycles import Cycles
from gridfl.server.tables import cycles, worker_cycles

#: how often a report retries when the buffer it locked was published meanwhile (another
#: transaction completed it; the next buffer is in the next snapshot)
_RETRIES = 8

_seat_now = sa.select(worker_cycles.c.request_key, worker_cycles.c.reported_at).where(
    worker_cycles.c.id == sa.bindparam("seat_id")
)

_rekey = (
    worker_cycles.update()
    .where(worker_cycles.c.id == sa.bindparam("b_seat_id"))
    .values(reported_at=None, num_samples=None, metrics=None)
)

_seats_of_worker = (
    sa.select(cycles.c.id, cycles.c.checkpoint_id, worker_cycles.c.request_key)
    .select_from(worker_cycles.join(cycles, worker_cycles.c.cycle_id == cycles.c.id))
    .where(
        worker_cycles.c.worker_id == sa.bindparam("worker_id"),
        cycles.c.process_id == sa.bindparam("process_id"),
    )
)


def rekey(conn: Connection, seat_id: int, request_key: str, now: float) -> None:
    """A worker asks again while the buffer it last joined is still open: its seat takes
    the new key (the old one stops working) and may report again."""
    conn.execute(_rekey, {"b_seat_id": seat_id, "request_key": request_key, "accepted_at": now})


def seat_for_key(conn: Connection, process_id: int, worker_id: str, key: str):
    """The seat (``id`` of its cycle, ``checkpoint_id``) of the worker in the process whose
    request key is ``key``, whatever the state of its buffer; ``None`` if none."""
    found = None
    for row in conn.execute(_seats_of_worker, {"worker_id": worker_id, "process_id": process_id}):
        if hmac.compare_digest(row.request_key.encode(), key.encode()):
            found = row
    return found


def report(
    engine: Engine,
    catalog: Catalog,
    buffers: Cycles,
    seat,
    diff: Sequence[np.ndarray],
    req: _messages.ReportRequest,
    spec: agg.ModelSpec,
) -> bool:
    """Fold one validated report of ``seat`` (a ``worker_seats`` row) into the process's
    open buffer; returns whether this report published it. Raises
    :class:`ConflictError` for a report already counted, one staler than
    ``max_staleness`` (nothing is written), or a process with no open buffer."""
    for _ in range(_RETRIES):
        buffer_id = None
        try:
            with db.write(engine) as conn:
                buffer = storage.open_cycle(conn, seat.process_id, lock=True)
                if buffer is None:
                    if storage.process_by_id(conn, seat.process_id).status == "running":
                        continue  # published by another transaction since this snapshot
                    raise ConflictError(
                        "the FL process is no longer running: the report came too late"
                    )
                buffer_id = buffer.id
                sums = _fold(conn, catalog, buffers, buffer, seat, diff, req, spec)
        except BaseException:
            if buffer_id is not None:
                buffers.forget_sums(buffer_id)
            raise
        # committed: the next report of the buffer starts from these sums
        if sums is None:
            buffers.forget_sums(buffer_id)
            return True
        buffers.keep_sums(buffer_id, sums)
        return False
    raise ConflictError("the buffer kept being published under this report; send it again")


def _fold(conn, catalog, buffers: Cycles, buffer, seat, diff, req, spec):
    """The report's writes; returns the buffer's sums, or ``None`` when it was published."""
    now_seat = conn.execute(_seat_now, {"seat_id": seat.id}).one()
    if now_seat.reported_at is not None:
        raise ConflictError(f"this worker already reported for cycle {seat.sequence}")
    if not hmac.compare_digest(now_seat.request_key.encode(), seat.request_key.encode()):
        raise ConflictError(
            "this request key was replaced by the worker's newer cycle request; report "
            "with the new key"
        )
    process = catalog.process(conn, buffer.process_id)
    cfg = process.server_config
    numbers = storage.checkpoint_numbers(conn, {seat.checkpoint_id, buffer.checkpoint_id})
    trained_on, latest = numbers[seat.checkpoint_id], numbers[buffer.checkpoint_id]
    staleness = latest - trained_on
    why = fedbuff.too_stale(cfg, staleness, trained_on, latest)
    if why is not None:
        raise ConflictError(why)
    scale = cfg["server_lr"] * fedbuff.staleness_weight(cfg, staleness)
    sums = buffers.load_sums(conn, buffer.id, spec)
    fedbuff.fold(catalog.strategy(conn, process.id), sums, diff, scale)
    buffers.store_sums(conn, buffer.id, sums)
    now = time.time()
    storage.mark_reported(conn, seat.id, now, req.num_samples, req.metrics)
    received = buffer.num_reports + 1
    storage.count_report(conn, buffer.id, received)
    buffers.crash_point("report")
    if received < cfg["buffer_size"]:
        return sums
    buffers.complete(conn, buffer, process, sums)
    return None
