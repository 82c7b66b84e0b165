"""A cycle's life after it opens: folding reports into its running sums, completing it
(aggregate, new checkpoint, next cycle), expiring it, closing it at its deadline, and
telling the other server processes (PostgreSQL NOTIFY) that one opened.

Every write here runs inside a transaction that holds the cycle's row lock, so a cycle
completes exactly once, even with several server processes on one database.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
from sqlalchemy.engine import Connection, Engine

from gridfl._exceptions import ModelError
from gridfl.server import aggregate as agg
from gridfl.server import db, partials, rules, storage, strategy_store
from gridfl.server.catalog import Catalog
from gridfl.server.rejections import RejectionCounts

log = logging.getLogger("gridfl.server")

#: PostgreSQL channel on which a server process announces each cycle it opens (payload:
#: its GridNode.instance_id), so the other processes on the database wake their long-polled
#: cycle requests within milliseconds (app.py listens), not at their next recheck.
CYCLE_CHANNEL = "gridfl_cycles"


class Cycles:
    """Opens, folds into, completes, expires and closes cycles for one node process.

    ``close_timeout``: how long a durability ``"cycle"`` cycle that is ready waits for
    the other server processes' partial sums before it expires (``Settings.close_timeout``).
    ``crash_at`` is TEST-ONLY fault injection (``Settings.test_crash_at``): see
    :meth:`crash_point`.
    """

    def __init__(
        self,
        engine: Engine,
        catalog: Catalog,
        instance_id: str,
        rejections: RejectionCounts,
        *,
        close_timeout: float = 10.0,
        crash_at: str | None = None,
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.instance_id = instance_id
        self.rejections = rejections
        self.close_timeout = close_timeout
        self.crash_at = crash_at
        self._notify_others = engine.dialect.name == "postgresql"
        #: SQLite: this is the database's one server process, so partial sums held by any
        #: other (an earlier run of it) died with it
        self._sole_process = engine.dialect.name == "sqlite"
        # cycle id -> [version, sum_w, sum_x]; version -1 while a fold is in flight
        self._sums: dict[int, list] = {}
        #: durability "cycle": this process's partial sums of open cycles, in memory only
        self.partials = partials.Partials(instance_id)
        self._sums_lock = threading.Lock()

    def crash_point(self, name: str) -> None:
        """TEST-ONLY: when ``crash_at`` is ``name`` the process dies here (``os._exit(137)``,
        as abruptly as ``kill -9``: no cleanup, no commit).

        Points: ``report`` (inside a report's transaction, after the diff is folded in and
        the worker marked reported, before commit) and ``aggregate`` (inside the completion
        transaction, after the new checkpoint row is written and the cycle marked
        completed, before commit). tests/faults/ use them to prove a crash there leaves
        nothing half-done. Never set in production.
        """
        if self.crash_at == name:
            log.warning(
                "GRIDFL_TEST_CRASH_AT=%s: exiting abruptly (test-only fault injection)", name
            )
            logging.shutdown()
            os._exit(137)

    # ------------------------------------------------------------------ opening
    def announce(self, conn: Connection) -> None:
        """PostgreSQL: tell the other server processes on this database that a cycle opened
        or a process stopped running (NOTIFY on ``CYCLE_CHANNEL``, delivered when and only
        if this transaction commits), so what they hold for it is answered at once."""
        if self._notify_others:
            storage.notify(conn, CYCLE_CHANNEL, self.instance_id)

    def open_next(self, conn: Connection, process, checkpoint_id: int, now: float) -> int:
        """Open the process's next cycle on ``checkpoint_id``; returns its id."""
        self.announce(conn)
        return storage.insert_cycle(
            conn,
            process.id,
            checkpoint_id=checkpoint_id,
            start_at=now,
            end_at=rules.cycle_deadline(process.server_config, now),
            status="open",
            num_reports=0,
        )

    # ------------------------------------------------------------------ running sums
    def load_sums(self, conn: Connection, cycle_id: int, spec: agg.ModelSpec) -> agg.RunningSums:
        """The cycle's running sums (cached in memory, checked against the row's version);
        the caller holds the cycle's lock."""
        row = conn.execute(storage.aggregate_counts, {"cycle_id": cycle_id}).first()
        if row is None:
            storage.insert_aggregate(conn, cycle_id)
            sums = agg.RunningSums(spec)
        else:
            sums = agg.RunningSums(
                spec, row.version, count_w=row.count_w, weight=row.weight, count_x=row.count_x
            )
        with self._sums_lock:
            cached = self._sums.get(cycle_id)
            if cached is not None and cached[0] == sums.version:
                cached[0] = -1  # a fold is in flight: nobody else may trust these arrays
                sums.sum_w, sums.sum_x = cached[1], cached[2]
                return sums
        if sums.count_w or sums.count_x:
            blobs = conn.execute(storage.aggregate_sums, {"cycle_id": cycle_id}).one()
            if blobs.sum_w is not None:
                sums.sum_w = np.frombuffer(blobs.sum_w, dtype=spec.acc_dtype).copy()
            if blobs.sum_x is not None:
                sums.sum_x = np.frombuffer(blobs.sum_x, dtype=spec.acc_dtype).copy()
        return sums

    @staticmethod
    def store_sums(conn: Connection, cycle_id: int, sums: agg.RunningSums) -> None:
        """Write the side of the sums the last fold changed, and count the fold in
        ``version``; the other side's blob is not rewritten."""
        sums.version += 1
        values: dict = {"b_cycle_id": cycle_id, "version": sums.version}
        if sums.changed == "w":
            assert sums.sum_w is not None  # a fold into it just happened
            values.update(count_w=sums.count_w, weight=sums.weight, sum_w=sums.sum_w.data.cast("B"))
        elif sums.changed == "x":
            assert sums.sum_x is not None
            values.update(count_x=sums.count_x, sum_x=sums.sum_x.data.cast("B"))
        elif sums.changed == "kept":
            assert sums.kept is not None
            values.update(count_x=sums.count_x)
            strategy_store.keep_diff(conn, cycle_id, sums.kept)
            sums.kept = None
        conn.execute(storage.store_sums, values)

    def keep_sums(self, cycle_id: int, sums: agg.RunningSums) -> None:
        """After the fold's commit: the next report of the cycle starts from these arrays."""
        with self._sums_lock:
            self._sums[cycle_id] = [sums.version, sums.sum_w, sums.sum_x]

    def forget_sums(self, cycle_id: int) -> None:
        with self._sums_lock:
            self._sums.pop(cycle_id, None)

    def drop_live(self, cycle_id: int) -> None:
        """The cycle closes: this process's partial sums (durability ``"cycle"``) go."""
        self.partials.drop(cycle_id)

    # ------------------------------------------------------------------ durability "cycle"
    def live_sums(self, conn: Connection, cycle, spec: agg.ModelSpec) -> agg.RunningSums | None:
        """Durability ``"cycle"``: this process's partial sums of the cycle, held in its
        memory only, or ``None`` when they were lost: they count other than the reports its
        transactions committed (the process restarted, or a transaction failed after its
        fold). The caller holds the cycle's lock, and expires the cycle when they are lost
        (:meth:`expire_lost`). With one server process (SQLite) they must hold every
        report of the cycle."""
        sums = self.partials.held(conn, cycle.id, spec)
        if sums is None or not self._sole_process:
            return sums
        return sums if sums.count_w + sums.count_x == cycle.num_reports else None

    def close_ready(self, conn: Connection, cycle, process, spec, received: int, now: float) -> str:
        """Durability ``"cycle"``: the cycle (locked) is ready with ``received`` reports.
        When this process's sums hold them all, complete it from them: ``"completed"``.
        Otherwise write its sums (if it took reports), mark the cycle closing with
        ``close_timeout`` seconds for the other processes to write theirs (its new
        ``end_at``), and wake them (NOTIFY): ``"closing"``. ``"lost"`` when this process's
        sums were lost and the cycle expired."""
        committed, _ = self.partials.committed(conn, cycle.id)
        if committed or self._sole_process:
            sums = self.partials.held(conn, cycle.id, spec)
            if sums is None or (self._sole_process and committed != received):
                self.expire_lost(conn, cycle, process, now)
                return "lost"
            if committed == received:  # one process took every report: nothing to wait for
                self.complete(conn, cycle, process, sums)
                return "completed"
            self.partials.write(conn, cycle.id, sums)
        partials.set_closing(conn, cycle.id, now, now + self.close_timeout)
        self.announce(conn)
        log.info(
            "cycle %s/%s #%d is ready: collecting the server processes' partial sums",
            process.name, process.version, cycle.sequence,
        )
        return "closing"

    def write_partials(self, now: float) -> int:
        """Durability ``"cycle"``: write this process's partial sums of every cycle that is
        closing, and complete the cycle when they were the last; forget those of cycles
        that closed. Returns how many cycles closed here."""
        held = self.partials.held_ids()
        if not held:
            return 0
        with db.read(self.engine) as conn:
            due = partials.closing_or_closed(conn, held)
        closed = 0
        for cycle_id in due:
            try:
                closed += self._write_partial(cycle_id, now)
            except Exception:  # the others still go; the next wake-up retries this one
                log.exception("writing the partial sums of cycle %s failed", cycle_id)
        return closed

    def _write_partial(self, cycle_id: int, now: float) -> int:
        """Write this process's partial sums of a closing cycle, completing it when they
        were the last; then forget them (the cycle closed, or they are written)."""
        closed = 0
        with db.write(self.engine) as conn:
            cycle = storage.lock_cycle(conn, cycle_id)
            if cycle is not None and cycle.status == "open" and cycle.closing_at is not None:
                committed, written = self.partials.committed(conn, cycle_id)
                if committed and not written:
                    closed = self._give_partial(conn, cycle, now)
        self.partials.drop(cycle_id)
        return closed

    def _give_partial(self, conn: Connection, cycle, now: float) -> int:
        process = self.catalog.process(conn, cycle.process_id)
        _, _, spec = self.catalog.checkpoint(conn, cycle.checkpoint_id)
        sums = self.partials.held(conn, cycle.id, spec)
        if sums is None:  # the cycle can never add up: no need to wait for its deadline
            self.expire_lost(conn, cycle, process, now)
            return 1
        self.partials.write(conn, cycle.id, sums)
        if partials.missing(conn, cycle.id):
            return 0
        total = partials.combined(conn, cycle.id, spec)
        if total.count_w + total.count_x != cycle.num_reports:
            self.expire_lost(conn, cycle, process, now)
        else:
            self.complete(conn, cycle, process, total)
        return 1

    def expire_lost(self, conn: Connection, cycle, process, now: float) -> None:
        """Expire a cycle whose in-memory sums are gone: it reopens on the same checkpoint,
        and its reports, which nothing holds any more, count nowhere."""
        self.expire(
            conn, cycle, process, now,
            "its running sums were lost (durability 'cycle': the node restarted or a "
            "report's transaction failed)", warn=True,
        )

    def expire_all_lost(self) -> int:
        """At startup (one server process on SQLite): expire every open durability
        ``"cycle"`` cycle that committed reports, whose sums died with the last process;
        returns how many."""
        expired = 0
        with db.write(self.engine) as conn:
            for cycle in storage.open_cycles_with_reports(conn):
                process = self.catalog.process(conn, cycle.process_id)
                if process.server_config.get("durability") == "cycle":
                    self.expire_lost(conn, cycle, process, time.time())
                    expired += 1
        return expired

    # ------------------------------------------------------------------ closing
    def complete(self, conn: Connection, cycle, process, sums: agg.RunningSums) -> None:
        """Aggregate, write the new checkpoint, close the cycle, open the next one; or
        expire the cycle when its result does not fit the model's dtypes."""
        from gridfl import state

        _, params, _ = self.catalog.checkpoint(conn, cycle.checkpoint_id)
        strategy = self.catalog.strategy(conn, process.id)
        now = time.time()
        if strategy.needs_every_diff:
            sums.diffs = strategy_store.kept_diffs(conn, cycle.id, sums.spec)
        # the state as it was after the cycle that made this checkpoint: written in that
        # cycle's completion transaction, so each step is applied exactly once
        previous = strategy_store.load_state(conn, cycle.checkpoint_id)
        try:
            new_params, new_state = strategy.aggregate(sums, params, previous)
        except ModelError as e:
            self.expire(conn, cycle, process, now, f"its result is not usable: {e}", warn=True)
            return
        data = state.dumps(new_params)
        number = storage.latest_checkpoint_number(conn, process.id) + 1
        # "latest" is the highest number: no alias moves from row to row, because any
        # UPDATE of a checkpoint row makes SQLite rewrite its whole model blob (13 MB of
        # WAL and ~70 ms for the McMahan CNN, inside the transaction that opens the next
        # cycle)
        ckpt = storage.insert_checkpoint(conn, process.id, number, data, now)
        if new_state is not None:
            summary = strategy.describe(new_state)
            strategy_store.save_state(conn, ckpt, process.id, new_state, summary)
        self.catalog.remember_checkpoint(ckpt, data, new_params, sums.spec)
        self.drop_live(cycle.id)
        self.rejections.write(conn, cycle.id)
        storage.close_cycle(
            conn, cycle.id, status="completed", closed_at=now, result_checkpoint_id=ckpt
        )
        done = storage.count_completed(conn, process.id)
        num_cycles = process.server_config.get("num_cycles") or 0
        log.info(
            "cycle %s/%s #%d completed: checkpoint %d",
            process.name,
            process.version,
            cycle.sequence,
            number,
        )
        # differential privacy: the next cycle would spend more than max_epsilon
        stop_reason = getattr(strategy, "stop_reason", None)
        if (num_cycles and done >= num_cycles) or stop_reason:
            storage.set_process_status(conn, process.id, "finished")
            self.announce(conn)
            log.info(
                "process %s/%s finished%s", process.name, process.version,
                f": {stop_reason}" if stop_reason else "",
            )
        else:
            self.open_next(conn, process, ckpt, now)
        self.crash_point("aggregate")

    def expire(
        self, conn: Connection, cycle, process, now: float, why: str, *, warn: bool = False
    ) -> None:
        """Close the cycle without a checkpoint: its reports are dropped and a new cycle
        opens on the same checkpoint."""
        self.drop_live(cycle.id)
        self.rejections.write(conn, cycle.id)
        storage.close_cycle(conn, cycle.id, status="expired", closed_at=now)
        self.open_next(conn, process, cycle.checkpoint_id, now)
        log.log(
            logging.WARNING if warn else logging.INFO,
            "cycle %s/%s #%d expired with %d reports: %s",
            process.name,
            process.version,
            cycle.sequence,
            cycle.num_reports,
            why,
        )

    def close_at_deadline(self, cycle_id: int, now: float) -> int:
        """Complete or expire one cycle whose deadline passed; 1 if this call closed it."""
        try:
            with db.write(self.engine) as conn:
                cycle = storage.lock_cycle(conn, cycle_id)
                still_open = cycle is not None and cycle.status == "open"
                if not still_open or cycle.end_at is None or cycle.end_at > now:
                    return 0
                process = storage.process_by_id(conn, cycle.process_id)
                cfg, received = process.server_config, cycle.num_reports
                if cycle.closing_at is not None:  # a process died, or is stuck or cut off
                    missing = partials.missing(conn, cycle_id)
                    self.expire(
                        conn, cycle, process, now,
                        f"the partial sums of {missing} server process(es) did not arrive "
                        f"within close_timeout ({self.close_timeout:g} s)", warn=True,
                    )
                    return 1
                if rules.ready(
                    cfg,
                    received=received,
                    accepted=lambda: storage.count_seats(conn, cycle_id),
                    end_at=cycle.end_at,
                    now=now,
                ):
                    _, _, spec = self.catalog.checkpoint(conn, cycle.checkpoint_id)
                    if cfg.get("durability") != "cycle":
                        self.complete(conn, cycle, process, self.load_sums(conn, cycle_id, spec))
                    else:
                        self.close_ready(conn, cycle, process, spec, received, now)
                else:
                    self.expire(
                        conn, cycle, process, now, "too few reports (min_diffs) or workers"
                    )
        finally:
            self.forget_sums(cycle_id)
        return 1
