"""How many cycle requests each cycle turned away (``cycles.num_rejected``, the
dashboard's cycle table and the status API's ``rejected``).

A rejection on the locked admission path is counted in its own transaction. The fast
path that turns workers away from a full cycle is read-only on purpose (workers
long-polling a full cycle would otherwise each take the cycle's row lock), so its
rejections wait here, in this server process's memory, and are written with the next
locked admission: at the latest the next cycle's first. A crash loses the few waiting.
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
    >>> sorted(counts.take().items())
    [(7, 2), (9, 1)]
    >>> counts.take()
    Counter()
    """

    def __init__(self) -> None:
        self._waiting: Counter[int] = Counter()
        self._lock = threading.Lock()

    def add(self, cycle_id: int) -> None:
        with self._lock:
            self._waiting[cycle_id] += 1

    def take(self) -> Counter[int]:
        with self._lock:
            taken, self._waiting = self._waiting, Counter()
        return taken

    def write(self, conn: Connection, rejected_now: int | None = None) -> None:
        """Write the waiting counts, plus one for ``rejected_now`` (a cycle's id), inside
        the caller's write transaction."""
        counts = self.take()
        if rejected_now is not None:
            counts[rejected_now] += 1
        for cycle_id, n in sorted(counts.items()):  # one lock order for every writer
            conn.execute(_add, {"r_cycle_id": cycle_id, "r_count": n})
