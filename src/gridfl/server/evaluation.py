"""Federated evaluation (``server_config.evaluation``, docs/configs.md): after every
``every`` completed cycles, workers that name the ``evaluation`` capability run the hosted
evaluation plan on their own held-out data against that checkpoint and report metrics
only; the status shows each checkpoint's metrics averaged weighted by ``num_samples``.

An evaluation runs alongside training, never in its place: it has no deadline, does not
count towards a cycle's ``max_workers``, the reuse rule or pace steering, and its seats
(at most ``evaluation.max_workers``) are offered before a training seat to a worker that
can evaluate and has not evaluated this checkpoint. A newer due checkpoint takes over new
seats; a seat of an older evaluation may still report. A seat not reported within
``evaluation.seat_timeout`` seconds (:func:`seat_timeout`) lapses: it no longer counts
towards ``max_workers``, so another worker can take it, and its late report is refused.
syft.js never names the capability, so it only ever trains.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from gridfl import _messages
from gridfl._exceptions import AuthenticationError, ConflictError, GridflError
from gridfl.server.tables import checkpoints, evaluation_seats, evaluations, processes, workers

#: ONNX ModelProto.metadata_props, and StringStringEntryProto's key and value
_METADATA_PROPS, _KEY, _VALUE = 14, 1, 2
#: seconds an evaluation seat waits for its report when neither ``seat_timeout`` nor the
#: cycle's ``cycle_length`` is set
DEFAULT_SEAT_TIMEOUT = 600.0


def seat_timeout(server_config: dict[str, Any]) -> float:
    """Seconds an evaluation seat is held for its report: ``evaluation.seat_timeout``,
    else the cycle's ``cycle_length``, else :data:`DEFAULT_SEAT_TIMEOUT`.

    >>> seat_timeout({"cycle_length": 60, "evaluation": {"every": 1, "seat_timeout": 5}})
    5.0
    >>> seat_timeout({"cycle_length": 60, "evaluation": {"every": 1}})
    60.0
    >>> seat_timeout({"cycle_length": None, "evaluation": {"every": 1}})
    600.0
    """
    given = (server_config.get("evaluation") or {}).get("seat_timeout")
    return float(given or server_config.get("cycle_length") or DEFAULT_SEAT_TIMEOUT)


def plan_kind(onnx: bytes) -> str | None:
    """A plan's ``gridfl.kind`` read from its ONNX metadata alone (no session, no graph):
    the catalog tells training plans from evaluation plans with it. None for bytes that
    are not ONNX (a plan damaged in storage fails at the worker's download, as before)."""
    from gridfl import _protobuf as pw

    buf = memoryview(onnx)
    try:
        for field, wire, start, stop, _ in pw.iter_fields(buf, 0, len(buf)):
            if field != _METADATA_PROPS or wire != pw.LEN:
                continue
            entry = {f: bytes(buf[a:b]) for f, w, a, b, _ in pw.iter_fields(buf, start, stop)
                     if w == pw.LEN}
            if entry.get(_KEY) == b"gridfl.kind":
                return entry.get(_VALUE, b"").decode("utf-8", "replace")
    except GridflError:
        return None
    return None


def plans_for(process, kind: str | None) -> dict[str, int]:
    """The plans an accepted reply names: with ``server_config.evaluation``, a training
    cycle lists the training plans and an evaluation cycle the evaluation plans, so that
    syft.js, which downloads every plan listed as tfjs, needs no tfjs evaluation plan;
    without it, every plan (as before)."""
    if process.server_config.get("evaluation") is None:
        return dict(process.plan_ids)
    wanted = kind == _messages.EVALUATION
    return {
        name: plan_id
        for name, plan_id in process.plan_ids.items()
        if (name in process.evaluation_plans) == wanted
    }


def wants(cfg: dict[str, Any], req: _messages.CycleRequest) -> bool:
    """Whether this cycle request may be placed in an evaluation."""
    return cfg.get("evaluation") is not None and _messages.EVALUATION in (req.capabilities or ())


def due_checkpoint(conn: Connection, process_id: int, every: int):
    """The newest checkpoint to evaluate (``id``, ``number``): checkpoint 1 is the hosted
    model and checkpoint ``k + 1`` comes out of the k-th completed cycle, so the due ones
    are ``k`` = every, 2 * every, ...; None before the first."""
    return conn.execute(
        sa.select(checkpoints.c.id, checkpoints.c.number)
        .where(
            checkpoints.c.process_id == process_id,
            checkpoints.c.number > 1,
            (checkpoints.c.number - 1) % every == 0,
        )
        .order_by(checkpoints.c.number.desc())
        .limit(1)
    ).first()


def _evaluation_of(conn: Connection, process_id: int, checkpoint_id: int) -> int:
    """The evaluation row of this checkpoint, created on first use (a concurrent creator
    on another server process wins the unique constraint; its row is used), locked."""
    where = (evaluations.c.process_id == process_id) & (
        evaluations.c.checkpoint_id == checkpoint_id
    )
    found = conn.execute(sa.select(evaluations.c.id).where(where).with_for_update()).scalar()
    if found is not None:
        return found
    try:
        with conn.begin_nested():
            conn.execute(
                evaluations.insert().values(
                    process_id=process_id, checkpoint_id=checkpoint_id, opened_at=time.time()
                )
            )
    except IntegrityError:
        pass
    return conn.execute(sa.select(evaluations.c.id).where(where).with_for_update()).scalar_one()


def admit(conn: Connection, process, worker_id: str) -> str | None:
    """Seat the worker in the due evaluation and return its request key, or None when
    there is nothing to evaluate, its seats are taken, or this worker already had one
    (a lapsed seat too: its worker had its turn). Lapsed seats are not taken."""
    cfg = process.server_config["evaluation"]
    due = due_checkpoint(conn, process.id, cfg["every"])
    if due is None:
        return None
    evaluation_id = _evaluation_of(conn, process.id, due.id)  # locked: admissions queue
    now = time.time()
    lapse_before = now - seat_timeout(process.server_config)
    seats = conn.execute(
        sa.select(
            evaluation_seats.c.worker_id,
            evaluation_seats.c.accepted_at,
            evaluation_seats.c.reported_at,
        ).where(evaluation_seats.c.evaluation_id == evaluation_id)
    ).all()
    taken = [s for s in seats if s.reported_at is not None or s.accepted_at >= lapse_before]
    if any(s.worker_id == worker_id for s in seats) or (
        cfg["max_workers"] is not None and len(taken) >= cfg["max_workers"]
    ):
        return None
    key = secrets.token_hex(32)
    conn.execute(
        evaluation_seats.insert().values(
            evaluation_id=evaluation_id,
            worker_id=worker_id,
            request_key=key,
            accepted_at=now,
        )
    )
    return key


def _seats_of_worker(conn: Connection, worker_id: str, *, lock: bool = False):
    stmt = (
        sa.select(
            evaluation_seats.c.id,
            evaluation_seats.c.request_key,
            evaluation_seats.c.accepted_at,
            evaluation_seats.c.reported_at,
            evaluations.c.process_id,
            evaluations.c.checkpoint_id,
        )
        .join(evaluations, evaluations.c.id == evaluation_seats.c.evaluation_id)
        .where(evaluation_seats.c.worker_id == worker_id)
    )
    return conn.execute(stmt.with_for_update() if lock else stmt).all()


def _match(rows, key: str):
    found = None
    for r in rows:  # constant-time, and every row compared: the key is a secret
        if hmac.compare_digest(r.request_key.encode(), key.encode()):
            found = r
    return found


def seat_for_key(conn: Connection, process_id: int, worker_id: str, key: str):
    """The evaluation seat ``key`` names (with its ``checkpoint_id``, which the worker may
    download), or None."""
    seat = _match(_seats_of_worker(conn, worker_id), key)
    return seat if seat is not None and seat.process_id == process_id else None


def report(conn: Connection, req: _messages.EvaluationReport) -> None:
    """Store one worker's metrics; refused for an unknown key, a second report, or a seat
    that lapsed (not reported within :func:`seat_timeout`)."""
    seat = _match(_seats_of_worker(conn, req.worker_id, lock=True), req.request_key)
    if seat is None:
        known = conn.execute(
            sa.select(workers.c.id).where(workers.c.id == req.worker_id)
        ).first()
        if known is None:
            err = AuthenticationError(_messages.MSG_WORKER_NOT_FOUND)
            err.http_status = 400  # as the other lookups of a worker id (PyGrid's status)
            raise err
        raise AuthenticationError(
            f"{_messages.MSG_INVALID_REQUEST_KEY} An evaluation report needs the request_key "
            "of an accepted evaluation cycle (kind 'evaluation'); a training cycle's diff "
            f"goes to {_messages.REPORT}"
        )
    if seat.reported_at is not None:
        raise ConflictError("this worker already reported its metrics for this evaluation")
    server_config = conn.execute(
        sa.select(processes.c.server_config).where(processes.c.id == seat.process_id)
    ).scalar_one()
    timeout = seat_timeout(server_config)
    late = time.time() - seat.accepted_at
    if late > timeout:
        raise ConflictError(
            f"the evaluation seat lapsed: metrics are taken up to {timeout:g} s after the "
            f"seat was accepted (server_config.evaluation.seat_timeout), this report came "
            f"after {late:.1f} s and the seat may have gone to another worker; ask for a "
            "new cycle"
        )
    conn.execute(
        evaluation_seats.update()
        .where(evaluation_seats.c.id == seat.id)
        .values(reported_at=time.time(), num_samples=req.num_samples, metrics=req.metrics)
    )


def summaries(conn: Connection, process_id: int, last: int, means) -> list[dict[str, Any]]:
    """The ``last`` newest evaluations, oldest first: the checkpoint's number, seats
    taken and reported, the examples evaluated and ``means(reported seats)``."""
    rows = conn.execute(
        sa.select(evaluations.c.id, evaluations.c.opened_at, checkpoints.c.number)
        .join(checkpoints, checkpoints.c.id == evaluations.c.checkpoint_id)
        .where(evaluations.c.process_id == process_id)
        .order_by(checkpoints.c.number.desc())
        .limit(last)
    ).all()
    if not rows:
        return []
    seats: dict[int, list] = {r.id: [] for r in rows}
    for s in conn.execute(
        sa.select(
            evaluation_seats.c.evaluation_id,
            evaluation_seats.c.reported_at,
            evaluation_seats.c.num_samples,
            evaluation_seats.c.metrics,
        ).where(evaluation_seats.c.evaluation_id.in_(list(seats)))
    ):
        seats[s.evaluation_id].append(s)
    out = []
    for r in reversed(rows):
        reported = [s for s in seats[r.id] if s.reported_at is not None]
        out.append(
            {
                "checkpoint": r.number,
                "opened_at": r.opened_at,
                "accepted": len(seats[r.id]),
                "reported": len(reported),
                "num_samples": sum(s.num_samples for s in reported),
                "metrics": means(reported),
            }
        )
    return out
