"""The grid node's logic, transport-agnostic: :class:`GridNode` composes the modules below
and is what both transports (HTTP routes, WebSocket) call, from a worker thread. Every
handler takes parsed input and returns a JSON-able ``dict`` (or bytes), raising
:mod:`gridfl._exceptions` errors.

* :mod:`~gridfl.server.worker_api`: the worker API (inherited by GridNode);
* :mod:`~gridfl.server.secagg`: the stages of secure aggregation (inherited too);
* :mod:`~gridfl.server.rules`: admission and completion rules, pure;
* :mod:`~gridfl.server.hosting`: host validation and the host transaction;
* :mod:`~gridfl.server.cycles`: folding, completing, expiring and closing cycles;
* :mod:`~gridfl.server.aggregate`: the running sums and aggregation strategies;
* :mod:`~gridfl.server.admin`: status, list, checkpoint, progress, stop, delete;
* :mod:`~gridfl.server.catalog`: caches of what never changes once written;
* :mod:`~gridfl.server.storage`: all SQL.

Concurrency: every write is one database transaction; a cycle's row is locked
(``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) by every write that
touches the cycle, so reports, their fold-in and the cycle's completion serialize per cycle
and a cycle completes exactly once, even with several server processes on one database.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from gridfl.server import admin, db, hosting, storage
from gridfl.server.catalog import Catalog
from gridfl.server.cycles import CYCLE_CHANNEL, Cycles
from gridfl.server.pacing import CheckInRate
from gridfl.server.rejections import RejectionCounts
from gridfl.server.secagg import RoundCache, SecAggApi
from gridfl.server.settings import Settings
from gridfl.server.worker_api import WorkerApi

__all__ = ["CYCLE_CHANNEL", "GridNode"]

log = logging.getLogger("gridfl.server")


class GridNode(WorkerApi, SecAggApi):
    """One grid node process's view of the database; thread-safe."""

    def __init__(self, settings: Settings | None = None, *, migrate: bool = True):
        self.settings = settings or Settings()
        self.url = self.settings.resolved_database_url()
        self.engine = db.create_engine(self.url)
        if migrate:
            db.migrate(self.engine)
        #: called (from any thread) when a cycle opens or closes and when a process stops
        #: or goes: the deadline timer re-plans and held requests look again
        self.on_cycles_changed: Callable[[], None] = lambda: None
        #: tells this process's own CYCLE_CHANNEL notifications from the others'
        self.instance_id = uuid.uuid4().hex
        self.catalog = Catalog()
        #: secure-aggregation rounds this process holds in memory between messages
        self.secagg_cache = RoundCache()
        #: check-ins per second per process, for pace steering
        self.check_ins = CheckInRate()
        #: rejections from the read-only admission path, until a write counts them
        self.rejections = RejectionCounts()
        self.cycles = Cycles(
            self.engine, self.catalog, self.instance_id, self.rejections,
            close_timeout=self.settings.close_timeout, crash_at=self.settings.test_crash_at,
        )

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ hosting
    def host(self, payload: Any) -> dict[str, Any]:
        """Host an FL process atomically (validate everything, then one transaction)."""
        reply = hosting.host(self.engine, self.cycles, payload)
        self.on_cycles_changed()
        return reply

    # ------------------------------------------------------------------ deadlines
    def next_deadline(self) -> float | None:
        """The earliest deadline of an open cycle or of an open secure-aggregation stage,
        or ``None``."""
        with db.read(self.engine) as conn:
            cycle = storage.next_deadline(conn)
        stage = self.next_stage_deadline()
        return min((t for t in (cycle, stage) if t is not None), default=None)

    def cycle_marker(self) -> tuple[int | None, int, int]:
        """(newest open cycle id, number of open cycles, number of them closing): changes
        whenever a cycle opens, closes or starts closing on this database, whichever server
        process did it. One cheap query; the
        app polls it every ``long_poll_recheck`` seconds to wake its long-polled requests."""
        with db.read(self.engine) as conn:
            return storage.cycle_marker(conn)

    def close_due_cycles(self, now: float | None = None) -> int:
        """Write this process's partial sums of closing cycles (durability ``"cycle"``),
        close every open cycle past its deadline, and every secure-aggregation stage past
        its timeout; returns how many cycles closed."""
        now = time.time() if now is None else now
        self.close_due_stages(now)
        closed = self.cycles.write_partials(now)
        with db.read(self.engine) as conn:
            due = storage.due_cycles(conn, now)
        for cycle_id in due:
            try:
                closed += self.cycles.close_at_deadline(cycle_id, now)
            except Exception:  # keep closing the others; the next wake-up retries
                log.exception("closing cycle %s at its deadline failed", cycle_id)
        if closed:
            self.on_cycles_changed()
        return closed

    # ------------------------------------------------------------------ admin
    def list_processes(self) -> list[dict[str, Any]]:
        return admin.list_processes(self.engine)

    def status(self, name: str, version: str | None, *, last: int = 100) -> dict[str, Any]:
        """Configs, the ``last`` cycles (with their workers' counts and mean metrics) and
        as many of the latest checkpoints."""
        return admin.status(self.engine, name, version, last=last)

    def checkpoint(self, name: str, version: str | None, ref: str | int = "latest") -> bytes:
        return admin.checkpoint(self.engine, name, version, ref)

    def progress(self, name: str, version: str | None) -> tuple[str, int]:
        """(the process's status, the sequence of its newest closed cycle, 0 before the
        first closes): one cheap read, for status requests held until a cycle closes."""
        return admin.progress(self.engine, name, version)

    def stop(self, name: str, version: str | None) -> dict[str, Any]:
        reply = admin.stop(self.engine, self.cycles, name, version)
        self.on_cycles_changed()  # requests held for this process answer now, not at their timeout
        return reply

    def delete(self, name: str, version: str | None) -> dict[str, Any]:
        reply = admin.delete(self.engine, name, version)
        self.on_cycles_changed()
        return reply
