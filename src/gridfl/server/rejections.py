"""How many cycle requests each cycle turned away (``cycles.num_rejected``, the
dashboard's cycle table and the status API's ``rejected``).

A rejection on the locked admission path is counted in its own transaction. The fast
path that turns workers away from a full cycle is read-only on purpose (workers
long-polling a full cycle would otherwise each take the cycle's row lock), so its
rejections wait here, in this server process's memory, until a write transaction of this
process may add them: one that holds that cycle's row lock (the next locked admission to
it, or its closing), or any locked admission once the cycle is closed. Never a count for
another open cycle: two admissions each holding their own cycle's lock and waiting for the
other's would deadlock. A crash loses the few waiting.
"""

from __future__ import annotations

import threading
from collections import Counter

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gridfl.server.tables import cycles

_add = (
    cycles.update()
    .where(cycles.c.id == sa.bindparam("r_cycle_id"))
    .values(num_rejected=cycles.c.num_rejected + sa.bindparam("r_count"))
)


class RejectionCounts:
    """Rejections from the read-only path, waiting to be written; thread-safe.

    >>> counts = RejectionCounts()
    >>> counts.add(7); counts.add(7); counts.add(9)
    >>> sorted(counts.take(lambda ids: ids).items())
    [(7, 2), (9, 1)]
    >>> counts.add(7); counts.add(9)
    >>> counts.take(lambda ids: [9])  # 7 is still open: it keeps waiting
    Counter({9: 1})
    >>> counts.take(lambda ids: ids)
    Counter({7: 1})
    """

    def __init__(self) -> None:
        self._waiting: Counter[int] = Counter()
        self._lock = threading.Lock()

    def add(self, cycle_id: int) -> None:
        with self._lock:
            self._waiting[cycle_id] += 1

    def take(self, writable) -> Counter[int]:
        """Remove and return the counts of the cycles ``writable(ids)`` returns."""
        with self._lock:
            ids = list(self._waiting)
        chosen = set(writable(ids)) if ids else set()
        with self._lock:
            return Counter({i: self._waiting.pop(i) for i in chosen if i in self._waiting})

    def write(self, conn: Connection, held: int, *, rejected_now: bool = False) -> None:
        """Inside the caller's write transaction, which holds cycle ``held``'s row lock:
        add that cycle's waiting count (plus one if ``rejected_now``) and those of closed
        cycles."""

        def writable(ids: list[int]) -> list[int]:
            others = [i for i in ids if i != held]
            closed: list[int] = []
            if others:
                closed = list(conn.execute(
                    sa.select(cycles.c.id).where(cycles.c.id.in_(others), cycles.c.status != "open")
                ).scalars())
            return [held, *closed]

        counts = self.take(writable)
        if rejected_now:
            counts[held] += 1
        for cycle_id, n in sorted(counts.items()):  # one lock order for every writer
            conn.execute(_add, {"r_cycle_id": cycle_id, "r_count": n})
