"""The node's stages of secure aggregation (docs/secure-aggregation.md) over the worker
protocol: ``model-centric/secure-aggregation`` on HTTP and the WebSocket.

A worker accepted into a cycle of a process hosted with ``secure_aggregation`` sends, per
stage, first its request for what the node has for it (``message`` null: the roster, the
sealed shares addressed to it, the unmask request; "waiting" while the stage has not
opened) and then its own message. The protocol's state is one row per cycle
(``secagg_rounds``: the stage, and what the node decided when a stage closed), one row per
worker message (``secagg_messages``, written once: a message costs the database its own
size, not the round's) and the masked running sum (``secagg_totals``), read and written
under the cycle's row lock, so any server process can take any message and a crash loses
at most the message in flight; a process keeps the round it wrote last in memory while the
row's version matches. With ``durability: "cycle"`` (one server process) the sum is never
written: it lives in that round, and a round read back with masked inputs in it has lost
it, so its cycle expires. When workers authenticate with JWTs, advertised keys must be
signed (:mod:`gridfl.secagg.identity`). A stage closes when every worker expected in it
has sent its message, or ``stage_timeout`` seconds after it opened (the node's deadline
timer closes it then, with or without a message); the first stage closes when ``max_diffs``
workers (else the cycle's capacity) advertised keys, or ``stage_timeout`` after the first
one with at least ``min_survivors``. When the last stage closes the node unmasks the
sum, hands it to the strategy as the cycle's running sums and completes the cycle; when too
few workers are left it expires the cycle, revealing nothing. The cycle's own deadline
(``cycle_length``) still expires a cycle whose protocol has not finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gridfl import _messages
from gridfl._exceptions import (
    AggregationAbortedError,
    ConflictError,
    InvalidRequestError,
)
from gridfl.secagg import NodeSession, SecAggParams
from gridfl.secagg import messages as m
from gridfl.server import aggregate as agg
from gridfl.server import db, privacy, storage
from gridfl.server.config import worker_capacity
from gridfl.server.secagg_wire import (
    RETRY_AFTER,
    check_identity,
    parse_message,
    reply_to,
    submit_message,
)
from gridfl.server.tables import secagg_messages, secagg_rounds, secagg_totals
from gridfl.server.worker_api import find_seat, lock_existing_cycle

log = logging.getLogger("gridfl.server")

#: the stage of a round that ended with too few workers (its cycle expired)
ABORTED = "aborted"
#: seconds the node holds such a request, waiting for the stage to open, before it answers
#: "waiting" (gridfl.server.handlers). A stage closed by another server process wakes it
#: at once on PostgreSQL (NOTIFY), on SQLite when the hold runs out.
HOLD_WAITING = 5.0

_this_round = secagg_rounds.c.cycle_id == sa.bindparam("cycle_id")
#: the round's small columns; its state (O(n s)) and running sum (8 bytes per parameter)
#: are read only when this process does not hold the same version in memory
_round_head = sa.select(*(c for c in secagg_rounds.c if c.name != "state")).where(_this_round)
_round_state = sa.select(secagg_rounds.c.state).where(_this_round)
_round_stage = sa.select(
    secagg_rounds.c.stage, secagg_rounds.c.stage_at, secagg_rounds.c.first_at
).where(_this_round)
_round_messages = sa.select(
    secagg_messages.c.stage, secagg_messages.c.worker_id, secagg_messages.c.body
).where(secagg_messages.c.cycle_id == sa.bindparam("cycle_id"))
_round_total = sa.select(secagg_totals.c.total).where(
    secagg_totals.c.cycle_id == sa.bindparam("cycle_id")
)
_open_rounds = sa.and_(
    secagg_rounds.c.cycle_id == storage.cycles.c.id, storage.cycles.c.status == "open"
)
_due_rounds = sa.select(secagg_rounds.c.cycle_id).where(
    _open_rounds, secagg_rounds.c.due_at <= sa.bindparam("now")
)
_next_due = sa.select(sa.func.min(secagg_rounds.c.due_at)).where(_open_rounds)


def session_of(process_id: int, cycle_id: int) -> bytes:
    """The cycle's name in every key derivation and sealed share: nothing carries over."""
    return f"gridfl process {process_id} cycle {cycle_id}".encode()


class RoundCache:
    """The rounds this server process wrote last, by cycle, with their version. A round is
    taken out while a transaction uses it and put back only after that transaction
    committed, so a failed one leaves nothing stale; a version that does not match the
    database's (another process wrote since) is read again. Thread-safe under the GIL:
    ``dict.pop`` hands a round to one thread only."""

    def __init__(self) -> None:
        self._rounds: dict[int, tuple[int, NodeSession]] = {}

    def take(self, cycle_id: int, version: int) -> NodeSession | None:
        held = self._rounds.pop(cycle_id, None)
        return held[1] if held is not None and held[0] == version else None

    def keep(self, cycle_id: int, held: tuple[int, NodeSession] | None) -> None:
        if held is None:
            self._rounds.pop(cycle_id, None)
        else:
            self._rounds[cycle_id] = held


class SecAggApi:
    """The ``secure-aggregation`` handler, mixed into :class:`~gridfl.server.GridNode`."""

    secagg_cache: RoundCache
    engine: Any
    catalog: Any
    cycles: Any
    on_cycles_changed: Any

    def secure_aggregation(self, req: _messages.SecAggRequest) -> dict[str, Any]:
        """One worker's secure-aggregation request (see the module docstring)."""
        (result,) = self.secure_aggregation_batch([req])
        if isinstance(result, Exception):
            raise result
        return result

    def secure_aggregation_batch(
        self, reqs: list[_messages.SecAggRequest]
    ) -> list[dict[str, Any] | Exception]:
        """Requests that arrived together (a stage's burst), one reply or exception each,
        in order: each cycle's messages are taken in one write transaction, so that n
        masked inputs write the running sum once per batch instead of once each. A bad
        message gets its own error and the others go on."""
        results: list[dict[str, Any] | Exception | None] = [None] * len(reqs)
        by_cycle: dict[int, list[tuple[int, _messages.SecAggRequest, Any, Any]]] = {}
        for i, req in enumerate(reqs):
            try:
                prepared = self._prepare(req)
            except Exception as e:  # noqa: BLE001 - its reply, not the batch's
                results[i] = e
                continue
            if isinstance(prepared, dict):
                results[i] = prepared
                continue
            seat, msg = prepared
            by_cycle.setdefault(seat.cycle_id, []).append((i, req, seat, msg))
        for cycle_id, items in by_cycle.items():
            try:
                replies = self._take(cycle_id, items)
            except Exception as e:  # noqa: BLE001 - the transaction failed: all of its
                replies = [e] * len(items)
            for (i, *_), reply in zip(items, replies, strict=True):
                results[i] = reply
        return [r for r in results if r is not None]

    def _prepare(self, req: _messages.SecAggRequest):
        """Checks that need no lock, in one read: ``(seat, typed message)``, or the reply
        to a poll for a stage that has not opened."""
        with db.read(self.engine) as conn:
            seat = find_seat(conn, req.worker_id, req.request_key)
            _, _, spec = self.catalog.checkpoint(conn, seat.checkpoint_id)
            params, auth = _params_of(self.catalog.process(conn, seat.process_id))
            session = session_of(seat.process_id, seat.cycle_id)
            msg = parse_message(req, spec.total + 1, params)
            if isinstance(msg, m.AdvertiseKeys):
                check_identity(msg, auth, session, req.worker_id)
            if msg is None and seat.status == "open":
                early = _still_waiting(conn, req, seat.cycle_id, params, session)
                if early is not None:
                    return early
        return seat, msg

    def _take(self, cycle_id: int, items: list) -> list[dict[str, Any] | Exception]:
        """One cycle's requests under its row lock: their messages, then their replies."""
        errors: dict[int, Exception] = {}
        answers: dict[int, dict[str, Any]] = {}
        with db.write(self.engine) as conn:
            cycle = lock_existing_cycle(conn, cycle_id)
            if cycle.status != "open":
                aborted = conn.execute(_round_head, {"cycle_id": cycle.id}).first()
                if aborted is not None and aborted.stage == ABORTED:
                    why = conn.execute(_round_state, {"cycle_id": cycle.id}).scalar_one()
                    return [_aborted(why["reason"], why["session"])] * len(items)
                raise ConflictError(
                    f"cycle {cycle.sequence} is closed ({cycle.status}): secure aggregation "
                    "ended without this worker"
                )
            spec = self.catalog.checkpoint(conn, cycle.checkpoint_id)[2]

            def submit(node: NodeSession) -> None:
                for j, (_, req, seat, msg) in enumerate(items):
                    if msg is None:
                        continue
                    try:
                        submit_message(node, req, msg)
                    except (InvalidRequestError, ConflictError) as e:
                        errors[j] = e  # refused before it changed anything
                        continue
                    if req.stage == m.MASKED:  # its input is in the sum: it has reported
                        storage.mark_reported(conn, seat.id, time.time())

            def answer(node: NodeSession) -> dict[str, Any]:
                for j, (_, req, _, _) in enumerate(items):
                    if j not in errors:
                        try:
                            answers[j] = reply_to(node, req)
                        except ConflictError as e:
                            errors[j] = e
                return {}

            sending = any(msg is not None for *_, msg in items)
            reply, changed, keep = self._step(
                conn, cycle, spec, submit if sending else None, answer
            )
        self.secagg_cache.keep(cycle_id, keep)  # committed: reusable
        if changed:
            self.on_cycles_changed()
        if reply.get("status") == "aborted":
            return [reply] * len(items)
        return [
            errors[j] if j in errors else {**answers[j], **reply} for j in range(len(items))
        ]

    def close_due_stages(self, now: float | None = None) -> int:
        """The deadline timer's part: close every secure-aggregation stage past its
        ``stage_timeout`` though no message arrived (its workers may all have gone), so
        that the cycle moves on, or expires with too few, on time. Returns how many rounds
        moved."""
        now = time.time() if now is None else now
        with db.read(self.engine) as conn:
            due = conn.execute(_due_rounds, {"now": now}).scalars().all()
        moved = 0
        for cycle_id in due:
            try:
                with db.write(self.engine) as conn:
                    cycle = storage.lock_cycle(conn, cycle_id)
                    if cycle is None or cycle.status != "open":
                        continue
                    _, _, spec = self.catalog.checkpoint(conn, cycle.checkpoint_id)
                    _, changed, keep = self._step(conn, cycle, spec, None, None, now)
                self.secagg_cache.keep(cycle_id, keep)
                moved += 1
            except Exception:  # keep closing the others; the next wake-up retries
                log.exception("closing a secure-aggregation stage of cycle %s failed", cycle_id)
                continue
            if changed:
                self.on_cycles_changed()
        return moved

    def next_stage_deadline(self) -> float | None:
        """When the earliest open secure-aggregation stage times out, or ``None``."""
        with db.read(self.engine) as conn:
            return conn.execute(_next_due).scalar()

    def _step(
        self,
        conn: Connection,
        cycle,
        spec,
        submit: Callable[[NodeSession], None] | None,
        answer: Callable[[NodeSession], dict[str, Any]] | None,
        now: float | None = None,
    ) -> tuple[dict[str, Any], bool, tuple[int, NodeSession] | None]:
        """Under the cycle's row lock: load the round, close the stages that are due,
        take the worker's message (``submit``), close again, store the round. Returns the
        reply (``answer``'s, or the abort), whether the timer and held requests should
        look again, and the round to keep in memory once the transaction commits."""
        now = time.time() if now is None else now
        process = self.catalog.process(conn, cycle.process_id)
        session = session_of(process.id, cycle.id)
        # durability "cycle": the masked sum lives only in this process's memory (one
        # server process, SQLite) and is never written; a crash expires the cycle
        in_memory = process.server_config.get("durability") == "cycle"
        row = conn.execute(_round_head, {"cycle_id": cycle.id}).first()
        version = row.version if row is not None else 0
        node, lost = self._round(conn, cycle.id, row, process, spec, in_memory)
        stage_at, first_at = (row.stage_at, row.first_at) if row is not None else (now, now)
        before = (node.stage, row.due_at if row is not None else None)
        changed = False
        try:
            if lost:
                raise AggregationAbortedError(
                    "its masked running sum was lost (durability 'cycle': the node restarted "
                    "or a transaction failed); the cycle reopens on the same checkpoint"
                )
            stage_at = self._advance(node, process, stage_at, first_at, now)
            if submit is not None:
                submit(node)
                stage_at = self._advance(node, process, stage_at, first_at, now)
            reply = {**(answer(node) if answer else {}), "session": session.decode()}
        except AggregationAbortedError as e:
            self.cycles.expire(conn, cycle, process, now, str(e), warn=True)
            changed = True
            # keys and shares are dropped; the reason stays for the other workers
            reply = _aborted(str(e), session.decode())
            values = {"stage": ABORTED, "stage_at": now, "due_at": None}
            # the masked sum goes too
            conn.execute(secagg_totals.delete().where(secagg_totals.c.cycle_id == cycle.id))
            conn.execute(secagg_messages.delete().where(secagg_messages.c.cycle_id == cycle.id))
            values["state"] = {"reason": str(e), "session": session.decode()}
        else:
            if node.stage == "done":
                self._complete(conn, cycle, process, node, spec)
                changed = True
            due_at = _due_at(node, stage_at, first_at, now)
            if not node.written and (node.stage, due_at) == before:
                # a poll, or messages all refused: nothing changed, nothing to write
                return reply, changed, (version, node) if row is not None else None
            values = dict(stage=node.stage, stage_at=stage_at, due_at=due_at)
            if row is None or node.stage != before[0]:
                values["state"] = node.state_json()  # decided at a stage close: O(n k), once
            written = node.take_written()
            if written:  # each message once, O(its own size)
                conn.execute(
                    secagg_messages.insert(),
                    [
                        {"cycle_id": cycle.id, "stage": st, "worker_id": u, "body": body}
                        for st, u, body in written
                    ],
                )
            if in_memory:
                node.total_changed = False
            elif node.total_changed:  # 8 bytes per parameter: written only when it moved
                self._store_total(conn, cycle.id, node, fresh=row is None)
            if node.stage != before[0]:  # wake what other server processes hold for it
                self.cycles.announce(conn)
            # a new or earlier stage deadline: the timer must plan for it
            changed = changed or (node.stage, due_at) != before
        values["version"] = version + 1
        if row is None:
            insert = secagg_rounds.insert().values(cycle_id=cycle.id, first_at=first_at)
            conn.execute(insert.values(**values))
        else:
            update = secagg_rounds.update().where(secagg_rounds.c.cycle_id == cycle.id)
            conn.execute(update.values(**values))
        live = values["stage"] in m.STAGES
        return reply, changed, (version + 1, node) if live else None

    def _round(
        self, conn: Connection, cycle_id: int, row, process, spec, in_memory: bool
    ) -> tuple[NodeSession, bool]:
        """The round this process holds for the stored version, else as stored (or new);
        and whether its masked sum was lost (durability "cycle", inputs folded elsewhere
        or before a restart)."""
        params = SecAggParams(**process.server_config["secure_aggregation"])
        session = session_of(process.id, cycle_id)
        if row is None:
            return NodeSession(params, session, spec.total + 1), False

        def load_total() -> bytes:
            if in_memory:  # nothing folded yet (else the sum was lost): zeros
                return bytes(8 * (spec.total + 1))
            return conn.execute(_round_total, {"cycle_id": cycle_id}).scalar_one()

        node = self.secagg_cache.take(cycle_id, row.version)
        if node is not None:
            node.read_total_with(load_total)
            return node, False
        node = self._load(conn, cycle_id, row.stage, params, session, spec, load_total)
        return node, in_memory and bool(node.masked)

    @staticmethod
    def _load(conn: Connection, cycle_id: int, stage: str, params, session, spec, load_total):
        """The round as stored: its state and every worker message it took."""
        state = conn.execute(_round_state, {"cycle_id": cycle_id}).scalar_one()
        rows = conn.execute(_round_messages, {"cycle_id": cycle_id}).all()
        data = {"stage": stage, **state, "messages": [tuple(r) for r in rows]}
        return NodeSession.from_state(params, session, spec.total + 1, data, load_total)

    @staticmethod
    def _store_total(conn: Connection, cycle_id: int, node: NodeSession, fresh: bool) -> None:
        # the sum's own bytes, no copy (it is model-sized and written at every batch)
        total = np.ascontiguousarray(node.total, "<u8").view(np.uint8).data
        if fresh:
            conn.execute(secagg_totals.insert().values(cycle_id=cycle_id, total=total))
        else:
            where = secagg_totals.c.cycle_id == cycle_id
            conn.execute(secagg_totals.update().where(where).values(total=total))
        node.total_changed = False

    def _advance(self, node: NodeSession, process, stage_at: float, first_at: float, now: float):
        """Close the current stage while it is due; returns when the open stage opened."""
        p = node.params
        cfg = process.server_config
        while node.stage != "done":
            got = node.received(node.stage)
            if node.stage == m.ADVERTISE:
                target = cfg.get("max_diffs") or worker_capacity(cfg) or p.min_survivors
                late = now >= first_at + p.stage_timeout and got >= p.min_survivors
                due = got >= target or late
            else:
                due = got >= len(node.participants(node.stage)) or now >= stage_at + p.stage_timeout
            if not due:
                break
            log.info(
                "secure aggregation %s/%s: stage %s closed with %d workers",
                process.name,
                process.version,
                node.stage,
                got,
            )
            node.close_stage()
            stage_at = now
        return stage_at

    def _complete(self, conn: Connection, cycle, process, node: NodeSession, spec) -> None:
        """The unmasked sum as the cycle's running sums (weighted side; the plain side with
        differential privacy), then completion."""
        total = node.result
        assert total is not None  # the last stage closed
        reports = len(node.masked)
        if process.server_config.get("differential_privacy"):
            # unweighted, and divided by the fixed expected count by the privacy wrapper
            try:
                sums = privacy.secure_sums(
                    process.server_config, spec, total, reports, node.params.scale
                )
            except InvalidRequestError as e:
                self.cycles.expire(conn, cycle, process, time.time(), str(e), warn=True)
                return
        else:
            sums = agg.unmasked_sums(total, reports, node.params, spec)
        storage.count_report(conn, cycle.id, reports)
        self.cycles.complete(conn, cycle, process, sums)


def _params_of(process) -> tuple[SecAggParams, dict | None]:
    """The process's protocol parameters and worker authentication config."""
    cfg = process.server_config.get("secure_aggregation")
    if cfg is None:
        raise InvalidRequestError(
            "this FL process does not run secure aggregation: send the diff with "
            f"{_messages.REPORT}"
        )
    return SecAggParams(**cfg), process.server_config.get("authentication")


def _still_waiting(conn: Connection, req, cycle_id: int, params: SecAggParams, session: bytes):
    """A poll for a stage that has not opened and cannot close yet (no timeout is due),
    answered from a read of the stage columns: most polls take no lock."""
    row = conn.execute(_round_stage, {"cycle_id": cycle_id}).first()
    stage = row.stage if row is not None else m.ADVERTISE
    order = (*m.STAGES, "done")
    if req.stage == m.ADVERTISE and stage in order:
        # a worker learning the session before it signs its keys: "ready" to advertise
        # (or, past this stage, to be told it is late); it opens nothing
        return {"stage": stage, "status": "ready", "session": session.decode()}
    if stage not in order or order.index(req.stage) <= order.index(stage):
        return None
    if row is not None:
        opened = row.first_at if stage == m.ADVERTISE else row.stage_at
        if time.time() >= opened + params.stage_timeout:
            return None  # the stage may close now: the locked path decides
    return {
        "stage": stage,
        "status": "waiting",
        "retry_after": RETRY_AFTER,
        "session": session.decode(),
    }


def _due_at(node: NodeSession, stage_at: float, first_at: float, now: float) -> float | None:
    """When the open stage times out; None when no stage is open, or when the first stage's
    timeout has passed with too few keys (it waits for more, or the cycle's deadline)."""
    if node.stage not in m.STAGES:
        return None
    due = (first_at if node.stage == m.ADVERTISE else stage_at) + node.params.stage_timeout
    if node.stage == m.ADVERTISE and due <= now:
        return None
    return due


def _aborted(reason: str, session: str) -> dict[str, Any]:
    return {"status": "aborted", "stage": ABORTED, "reason": reason, "session": session}


__all__ = ["HOLD_WAITING", "RoundCache", "SecAggApi", "session_of"]
