"""Durability ``"cycle"``: the partial sums each server process holds of an open cycle, a
sharded aggregator (docs/scaling.md).

A process folds the reports it takes into its own :class:`~gridfl.server.aggregate.RunningSums`,
in memory only. Each report's transaction also counts the report on the process's row of
``cycle_partials`` (no diff is written), so the database knows how many reports every
process's sums must hold. When the cycle is ready, each process writes its sums once to
its row, and the cycle is aggregated from the rows when all are written
(:mod:`gridfl.server.cycles` decides when). Sums that hold other than the committed count
(the process restarted, or a transaction failed after its fold) are *lost*: the cycle
expires instead of counting a report twice or leaving one out.

Every function here runs inside a transaction that holds the cycle's row lock.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gridfl.server import aggregate as agg
from gridfl.server.db import Prepared
from gridfl.server.tables import cycle_partials, cycles

_P = sa.bindparam
# the b_ prefix: SQLAlchemy reserves column names for an UPDATE's SET values
_mine = sa.and_(
    cycle_partials.c.cycle_id == _P("b_cycle_id"),
    cycle_partials.c.instance_id == _P("b_instance_id"),
)
# run with every report: on the driver's cursor (db.Prepared)
_committed = Prepared(
    sa.select(cycle_partials.c.num_reports, cycle_partials.c.written_at).where(_mine)
)
_count = Prepared(cycle_partials.update().where(_mine).values(num_reports=_P("num_reports")))
_first = Prepared(
    cycle_partials.insert().values(
        cycle_id=_P("b_cycle_id"), instance_id=_P("b_instance_id"), num_reports=1
    )
)
_write = cycle_partials.update().where(_mine)
_rows = sa.select(
    cycle_partials.c.instance_id, cycle_partials.c.num_reports, cycle_partials.c.written_at
).where(cycle_partials.c.cycle_id == _P("cycle_id"))
_sums = sa.select(
    cycle_partials.c.count_w, cycle_partials.c.weight, cycle_partials.c.count_x,
    cycle_partials.c.sum_w, cycle_partials.c.sum_x,
).where(cycle_partials.c.cycle_id == _P("cycle_id"))


class Partials:
    """This server process's partial sums of the open durability ``"cycle"`` cycles, by
    cycle id; thread-safe.

    >>> Partials("0" * 32).held_ids()
    []
    """

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self._sums: dict[int, agg.RunningSums] = {}
        self._lock = threading.Lock()

    def _key(self, cycle_id: int) -> dict:
        return {"b_cycle_id": cycle_id, "b_instance_id": self.instance_id}

    def committed(self, conn: Connection, cycle_id: int) -> tuple[int, bool]:
        """(reports this process's sums must hold, whether it wrote them already)."""
        row = _committed.first(conn, self._key(cycle_id))
        return (0, False) if row is None else (int(row.num_reports), row.written_at is not None)

    def held(self, conn: Connection, cycle_id: int, spec: agg.ModelSpec) -> agg.RunningSums | None:
        """This process's sums of the cycle, checked against the count its reports
        committed; ``None`` when they are lost."""
        committed, written = self.committed(conn, cycle_id)
        with self._lock:
            sums = self._sums.get(cycle_id)
            if committed == 0 and not written and (sums is None or sums.count_w + sums.count_x):
                # nothing committed here yet: whatever a failed transaction folded goes
                sums = self._sums[cycle_id] = agg.RunningSums(spec)
        if written or sums is None or sums.count_w + sums.count_x != committed:
            return None
        return sums

    def count(self, conn: Connection, cycle_id: int, num_reports: int) -> None:
        """Commit, with the report's transaction, how many reports this process folded."""
        if num_reports == 1:
            _first.run(conn, self._key(cycle_id))
        else:
            _count.run(conn, {**self._key(cycle_id), "num_reports": num_reports})

    def write(self, conn: Connection, cycle_id: int, sums: agg.RunningSums) -> None:
        """Write this process's sums to its row, once: the cycle is closing."""
        values: dict = {
            "written_at": time.time(), "count_w": sums.count_w, "weight": sums.weight,
            "count_x": sums.count_x,
        }
        for side in ("sum_w", "sum_x"):
            total = getattr(sums, side)
            values[side] = None if total is None else total.data.cast("B")
        conn.execute(_write.values(**values), self._key(cycle_id))

    def drop(self, cycle_id: int) -> None:
        with self._lock:
            self._sums.pop(cycle_id, None)

    def held_ids(self) -> list[int]:
        """The cycles this process holds sums of."""
        with self._lock:
            return list(self._sums)


def set_closing(conn: Connection, cycle_id: int, now: float, deadline: float) -> None:
    """The cycle is ready: it waits for the processes' partial sums until ``deadline``
    (its new ``end_at``, when the deadline timer expires it)."""
    conn.execute(
        cycles.update().where(cycles.c.id == cycle_id).values(closing_at=now, end_at=deadline)
    )


def missing(conn: Connection, cycle_id: int) -> int:
    """How many server processes that took reports of the cycle have not written their
    partial sums."""
    return sum(row.written_at is None for row in conn.execute(_rows, {"cycle_id": cycle_id}))


def combined(conn: Connection, cycle_id: int, spec: agg.ModelSpec) -> agg.RunningSums:
    """The cycle's sums: every process's written partial sums added up."""
    total = agg.RunningSums(spec)
    for row in conn.execute(_sums, {"cycle_id": cycle_id}):
        total.count_w += row.count_w
        total.count_x += row.count_x
        total.weight += row.weight
        for side in ("sum_w", "sum_x"):
            blob = getattr(row, side)
            if blob is None:
                continue
            part = np.frombuffer(blob, dtype=spec.acc_dtype)
            if getattr(total, side) is None:
                setattr(total, side, part.copy())
            else:
                np.add(getattr(total, side), part, out=getattr(total, side))
    return total


def closing_or_closed(conn: Connection, cycle_ids: list[int]) -> list[int]:
    """Of these cycles, those closing or no longer open (or gone): where a process's
    partial sums must be written or dropped."""
    if not cycle_ids:
        return []
    still_open = set(
        conn.execute(
            sa.select(cycles.c.id).where(
                cycles.c.id.in_(cycle_ids), cycles.c.status == "open", cycles.c.closing_at.is_(None)
            )
        ).scalars()
    )
    return [i for i in cycle_ids if i not in still_open]
