"""The worker API (PyGrid's model-centric protocol): authenticate, cycle requests, asset
downloads and reports. :class:`~gridfl.server.service.GridNode` inherits it; error messages
and status codes follow PyGrid's, which syft.js's tests check."""

from __future__ import annotations

import hmac
import math
import random
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Connection, Engine

from gridfl import _messages, compression
from gridfl._exceptions import (
    AuthenticationError,
    ConflictError,
    GridError,
    GridflError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from gridfl.server import aggregate as agg
from gridfl.server import async_reports, db, evaluation, privacy, rules, storage
from gridfl.server.admin import process_named
from gridfl.server.auth import verify_worker_token
from gridfl.server.catalog import Catalog
from gridfl.server.config import requires_speed_test, worker_capacity
from gridfl.server.cycles import Cycles
from gridfl.server.pacing import CheckInRate
from gridfl.server.rejections import RejectionCounts
from gridfl.server.settings import Settings

# a worker in a long-running process holds a seat per cycle it joined: a report's lookup
# reads its few newest, not all of them
_RECENT_SEATS = 4


def find_seat(conn: Connection, worker_id: str, request_key: str):
    """The worker's seat (and its cycle) that ``request_key`` names, compared in constant
    time; an unknown worker or key is refused as PyGrid does. A report names one of the
    worker's newest seats: the others are read only when none of those matches."""
    rows = storage.worker_seats(conn, worker_id, last=_RECENT_SEATS)
    if not rows:
        if storage.worker_exists(conn, worker_id):
            raise _invalid_key()
        raise _not_found_400(_messages.MSG_WORKER_NOT_FOUND)
    match = _key_match(rows, request_key)
    if match is None and len(rows) == _RECENT_SEATS:
        match = _key_match(storage.worker_seats(conn, worker_id), request_key)
    if match is None:
        raise _invalid_key()
    return match


def lock_existing_cycle(conn: Connection, cycle_id: int):
    """The cycle's row, locked (:func:`storage.lock_cycle`); a cycle deleted with its FL
    process since the request found it is a conflict."""
    cycle = storage.lock_cycle(conn, cycle_id)
    if cycle is None:
        raise ConflictError("the cycle is gone: its FL process was deleted")
    return cycle


def _key_match(rows, request_key: str):
    """The row whose request_key is ``request_key``, each compared in constant time."""
    match = None
    for r in rows:
        if hmac.compare_digest(r.request_key.encode(), request_key.encode()):
            match = r
    return match


def _not_found_400(message: str) -> NotFoundError:
    """PyGrid answers these lookups with 400 and syft.js's tests expect it."""
    err = NotFoundError(message)
    err.http_status = 400
    return err


def _invalid_key() -> AuthenticationError:
    return AuthenticationError(_messages.MSG_INVALID_REQUEST_KEY)


def _compressed_diff(
    req: _messages.ReportRequest, wanted: dict[str, Any] | None, spec: agg.ModelSpec
) -> compression.CompressedDiff:
    """Validate a compressed report against what its process asked for (``wanted``)."""
    if wanted is None:
        raise InvalidRequestError(
            "this process takes no compressed reports (its server_config.compression "
            "is null): send the diff as plain State bytes"
        )
    if req.compression != wanted["kind"]:
        raise InvalidRequestError(
            f"this process takes {wanted['kind']!r}-compressed reports, not "
            f"{req.compression!r}"
        )
    return compression.decode(
        req.compression, req.diff, spec.shapes, spec.dtypes, fraction=wanted.get("fraction")
    )


class WorkerApi:
    """The worker-facing handlers; each takes a parsed request and returns a JSON-able
    ``dict`` (or bytes), raising :mod:`gridfl._exceptions` errors."""

    settings: Settings
    engine: Engine
    catalog: Catalog
    cycles: Cycles
    on_cycles_changed: Callable[[], None]

    check_ins: CheckInRate
    rejections: RejectionCounts

    def _timeout(self, cycle, process) -> int:
        """The ``timeout`` a rejected worker is told: to the open cycle's deadline, or
        paced (:func:`rules.paced_timeout`) when the process has ``pace_steering``."""
        now = time.time()
        rate = self.check_ins.observe(process.id, now)
        end_at = None if cycle is None else cycle.end_at
        wait = rules.retry_timeout(end_at, now, self.settings.retry_seconds)
        pacing = process.server_config.get("pace_steering")
        if pacing is None:
            return wait
        capacity = worker_capacity(process.server_config)
        needed = math.inf if capacity is None else capacity / pacing["window"]
        return rules.paced_timeout(wait, pacing["window"], rate, needed, random.random())

    def authenticate(self, req: _messages.AuthenticateRequest) -> dict[str, Any]:
        with db.read(self.engine) as conn:
            process = process_named(conn, req.model_name, req.model_version)
        cfg = process.server_config
        claims = verify_worker_token(
            req.auth_token,
            cfg.get("authentication"),
            endpoint_timeout=self.settings.auth_endpoint_timeout,
        )
        worker_id = str(uuid.uuid4())
        sub = claims.get("sub") if claims else None
        identity = f"sub:{sub}"[:320] if isinstance(sub, str) and sub else worker_id
        with db.write(self.engine) as conn:
            storage.insert_worker(
                conn, id=worker_id, process_id=process.id, identity=identity, created_at=time.time()
            )
        return _messages.AuthenticateResponse(worker_id, requires_speed_test(cfg)).to_json()

    def cycle_request(self, req: _messages.CycleRequest) -> dict[str, Any]:
        if req.ping is None and req.download is None and req.upload is None:
            full = self._full_cycle_rejection(req)
            if full is not None:
                return full
        with db.write(self.engine) as conn:
            return self._admit(conn, req)

    def admit_held(
        self, reqs: Sequence[_messages.CycleRequest]
    ) -> list[dict[str, Any] | Exception]:
        """Cycle requests that were held until a cycle opened, answered together: one write
        transaction for all of them (a savepoint each, so one failing request leaves the
        others' seats), where :meth:`cycle_request` would take one each, and each after a
        read-only look. When a cycle opens, every worker waiting for it asks at once.
        Returns each request's reply, or the error it raised, in order.

            >>> node.admit_held([req_a, req_b])  # doctest: +SKIP
            [{'status': 'accepted', ...}, {'status': 'rejected', ...}]
        """
        results: list[dict[str, Any] | Exception] = []
        with db.write(self.engine) as conn:
            for req in reqs:
                try:
                    with conn.begin_nested():
                        results.append(self._admit(conn, req))
                except Exception as e:  # noqa: BLE001 - it is this request's answer
                    results.append(e)
        return results

    def _admit(self, conn: Connection, req: _messages.CycleRequest) -> dict[str, Any]:
        """Accept or reject one cycle request, inside the caller's write transaction."""
        worker = conn.execute(storage.worker_process, {"worker_id": req.worker_id}).first()
        if worker is None:
            raise _not_found_400(_messages.MSG_WORKER_NOT_FOUND)
        process = self.catalog.process(conn, worker.process_id)
        if process.name != req.model or (
            req.version is not None and req.version != process.version
        ):
            raise PermissionDeniedError(
                f"this worker_id was issued for '{process.name}' version "
                f"'{process.version}'; authenticate for '{req.model}' first"
            )
        cfg = process.server_config
        unsupported = rules.missing_protocol(cfg, req.protocols)
        if unsupported is not None:  # no timeout: retrying cannot help this worker
            return _messages.CycleRejected(None, unsupported).to_json()
        missing = rules.missing_speed_field(cfg, req.ping, req.download, req.upload)
        if missing is not None:
            raise InvalidRequestError(f"'{missing}' is required")
        if req.ping is not None or req.download is not None or req.upload is not None:
            storage.store_speeds(conn, worker.id, req.ping, req.download, req.upload)
        cycle = self._open_cycle(conn, process.id) if worker.status == "running" else None
        if cycle is not None:  # the read-only path's rejections, under the cycle's lock
            self.rejections.write(conn, cycle.id)
        # an evaluation seat first (after the cycle's lock: a cycle completing now may make
        # its checkpoint due); it runs alongside training, and the last checkpoint is still
        # evaluated once the process has finished
        if worker.status in ("running", "finished") and evaluation.wants(cfg, req):
            key = evaluation.admit(conn, process, worker.id)
            if key is not None:
                return self._accepted(process, key, kind=_messages.EVALUATION)
        if worker.status != "running":
            reason = f"the FL process is {worker.status}"
            if worker.status == "finished":  # maybe its privacy budget is spent
                why = privacy.finished_reason(conn, process.id, cfg)
                reason = f"{reason}: {why}" if why else reason
            return _messages.CycleRejected(None, reason).to_json()
        if cycle is None:
            return _messages.CycleRejected(None, "the FL process has no open cycle").to_json()
        timeout = self._timeout(cycle, process)
        if cycle.closing_at is not None:  # ready, collecting its partial sums: no seat left
            return _messages.CycleRejected(timeout, "the cycle is closing").to_json()
        seats = conn.execute(storage.seats, {"cycle_id": cycle.id, "worker_id": worker.id}).one()
        buffered = cfg.get("mode") == "async"
        decision = rules.admit(
            cfg,
            sequence=cycle.sequence,
            accepted=seats.accepted,
            taken=seats.taken is not None and not buffered,
            download=req.download,
            upload=req.upload,
            last_joined=lambda: storage.last_cycle_joined(conn, worker.identity, process.id),
            draw=random.random,
        )
        if decision.reason is not None:  # rejected, and counted for the cycle table
            self.rejections.write(conn, cycle.id, rejected_now=True)
            return _messages.CycleRejected(timeout, decision.reason).to_json()
        request_key = secrets.token_hex(32)
        if buffered and seats.taken is not None:
            async_reports.rekey(conn, seats.taken, request_key, time.time())
        else:
            conn.execute(
                storage.accept,
                {
                    "cycle_id": cycle.id,
                    "worker_id": worker.id,
                    "identity": worker.identity,
                    "request_key": request_key,
                    "accepted_at": time.time(),
                },
            )
        return self._accepted(process, request_key)

    @staticmethod
    def _open_cycle(conn: Connection, process_id: int):
        """The process's open cycle, locked. On PostgreSQL (read committed) a lock that
        waited for a completing cycle's transaction finds that row closed and cannot see
        the cycle the transaction opened; a second statement, with a fresh snapshot, does.
        Without it the worker was told "no open cycle" and no timeout, and stopped."""
        cycle = conn.execute(storage.open_cycle_locked, {"process_id": process_id}).first()
        if cycle is None:
            cycle = conn.execute(storage.open_cycle_locked, {"process_id": process_id}).first()
        return cycle

    @staticmethod
    def _accepted(process, request_key: str, kind: str | None = None) -> dict[str, Any]:
        cfg = process.server_config
        plans = evaluation.plans_for(process, kind)
        return _messages.CycleAccepted(
            request_key=request_key,
            model=process.name,
            version=process.version,
            model_id=process.id,
            plans=plans,
            protocols=dict(process.protocol_ids),
            client_config=process.client_config,
            plan_digests={n: d for n, d in process.plan_digests.items() if n in plans},
            compression=cfg.get("compression"),
            kind=kind,
        ).to_json()

    def _full_cycle_rejection(self, req: _messages.CycleRequest) -> dict[str, Any] | None:
        """Fast path, read-only: the rejection of a request for a cycle that is already
        full, or ``None`` to take the locked path. Workers long-polling a full cycle
        re-ask whenever a cycle opens or closes; without this each re-ask would be a
        write transaction holding the cycle's row lock, which reports queue behind.
        """
        with db.read(self.engine) as conn:
            row = conn.execute(storage.admission, {"worker_id": req.worker_id}).first()
            if row is None or row.cycle_id is None or row.process_status != "running":
                return None
            process = self.catalog.process(conn, row.process_id)
        if process.name != req.model or (
            req.version is not None and req.version != process.version
        ):
            return None
        unsupported = rules.missing_protocol(process.server_config, req.protocols)
        if unsupported is not None:
            return _messages.CycleRejected(None, unsupported).to_json()
        if evaluation.wants(process.server_config, req):
            return None  # an evaluation seat may be free: the locked path looks
        reason = rules.full_cycle_reason(
            process.server_config, accepted=row.accepted, taken=row.taken is not None
        )
        if reason is None:
            return None
        self.rejections.add(row.cycle_id)  # written later: see rejections.py
        return _messages.CycleRejected(self._timeout(row, process), reason).to_json()

    # ------------------------------------------------------------------ downloads
    def _check_asset_access(self, conn: Connection, process_id: int, worker_id: str, key: str):
        """The worker must hold ``key`` for the process's currently open cycle; returns
        the cycle (``id``, ``checkpoint_id``)."""
        row = conn.execute(
            storage.asset_access, {"process_id": process_id, "worker_id": worker_id}
        ).first()
        held = row.request_key if row is not None else None
        if held is not None and hmac.compare_digest(held.encode(), key.encode()):
            return row
        seat = evaluation.seat_for_key(conn, process_id, worker_id, key)
        if seat is not None:  # an evaluation seat downloads the checkpoint it evaluates
            return seat
        if (
            storage.process_id_exists(conn, process_id)
            and self.catalog.process(conn, process_id).server_config.get("mode") == "async"
        ):
            # a seat outlives its buffer: its checkpoint stays downloadable
            seat = async_reports.seat_for_key(conn, process_id, worker_id, key)
            if seat is not None:
                return seat
        if held is not None:
            raise _invalid_key()
        # refused: find out why, in the order PyGrid reports it
        if storage.worker_row(conn, worker_id) is None:
            raise _not_found_400(_messages.MSG_WORKER_NOT_FOUND)
        if row is None:
            raise _not_found_400("Cycle not found!")
        raise _invalid_key()

    def get_model(self, req: _messages.AssetRequest) -> bytes:
        with db.read(self.engine) as conn:
            try:
                cycle = self._check_asset_access(conn, req.asset_id, req.worker_id, req.request_key)
            except GridError:
                if not storage.process_id_exists(conn, req.asset_id):
                    raise _not_found_400(_messages.MSG_MODEL_NOT_FOUND) from None
                raise
            return self.catalog.checkpoint(conn, cycle.checkpoint_id)[0]

    def get_plan(self, req: _messages.AssetRequest) -> bytes:
        with db.read(self.engine) as conn:
            row = self.catalog.plan_meta(conn, req.asset_id)
            if row is None:
                raise _not_found_400(_messages.MSG_PLAN_NOT_FOUND)
            try:
                self._check_asset_access(conn, row.process_id, req.worker_id, req.request_key)
            except GridError:
                # refused: the plan may have gone with its process since it was cached
                if conn.execute(storage.plan_meta, {"plan_id": req.asset_id}).first() is None:
                    self.catalog.forget_plan_meta(req.asset_id)
                    raise _not_found_400(_messages.MSG_PLAN_NOT_FOUND) from None
                raise
            have = [v for v in _messages.PLAN_VARIANTS if getattr(row, f"has_{v}")]
            variant = req.receive_operations_as or have[0]
            if variant not in have:
                raise InvalidRequestError(
                    f"plan '{row.name}' has no '{variant}' variant; it has: {', '.join(have)}"
                )
            return self.catalog.plan_bytes(conn, row.id, variant)

    def get_protocol(self, req: _messages.AssetRequest) -> bytes:
        with db.read(self.engine) as conn:
            row = storage.protocol_row(conn, req.asset_id)
            if row is None:
                raise _not_found_400(_messages.MSG_PROTOCOL_NOT_FOUND)
            self._check_asset_access(conn, row.process_id, req.worker_id, req.request_key)
            return bytes(row.data)

    def evaluation_report(self, req: _messages.EvaluationReport) -> dict[str, Any]:
        """Store the metrics of an evaluation cycle (:mod:`gridfl.server.evaluation`)."""
        with db.write(self.engine) as conn:
            evaluation.report(conn, req)
        return _messages.ReportResponse().to_json()

    def check_worker(self, worker_id: str) -> None:
        with db.read(self.engine) as conn:
            if storage.worker_exists(conn, worker_id):
                return
        raise _not_found_400(_messages.MSG_WORKER_NOT_FOUND)

    # ------------------------------------------------------------------ reports
    @staticmethod
    def _seat_of(conn: Connection, req: _messages.ReportRequest):
        """The seat (``worker_seats`` row) whose key the report carries, not yet reported."""
        match = find_seat(conn, req.worker_id, req.request_key)
        if match.reported_at is not None:
            raise ConflictError(f"this worker already reported for cycle {match.sequence}")
        return match

    def report(self, req: _messages.ReportRequest) -> dict[str, Any]:
        from gridfl import state

        # 1. find the worker's cycle by its request key (constant-time compare), no lock;
        # everything read here is checked again under the cycle's lock (3.)
        with db.lookup(self.engine) as conn:
            match = self._seat_of(conn, req)
            process_config = self.catalog.process(conn, match.process_id).server_config
            buffered = process_config.get("mode")
            if buffered != "async" and match.status != "open":
                raise ConflictError(
                    f"cycle {match.sequence} is closed ({match.status}): the report came too late"
                )
            _, _, spec = self.catalog.checkpoint(conn, match.checkpoint_id)
        # 2. decode and validate the diff outside any lock
        diff: Sequence[Any]
        if req.compression is not None:
            diff = _compressed_diff(req, process_config.get("compression"), spec)
        else:
            try:
                # refused as soon as it departs from the model: O(model tensors), not O(bytes)
                diff = agg.DenseDiff(
                    state.loads(
                        req.diff, expect=zip(spec.shapes, spec.dtypes, strict=True), views=True
                    )
                )
            except GridflError as e:
                raise InvalidRequestError(f"diff is not valid State bytes: {e}") from e
            agg.validate_diff(diff, spec)
        if buffered == "async":
            if async_reports.report(
                self.engine, self.catalog, self.cycles, match, diff, req, spec
            ):
                self.on_cycles_changed()
            return _messages.ReportResponse().to_json()
        # 3. fold in, mark reported, maybe complete: one transaction, cycle row locked
        cycle_id = match.cycle_id
        try:
            with db.write(self.engine) as conn:
                outcome = self._fold_report(conn, match, spec, diff, req)
        except BaseException:
            self.cycles.forget_sums(cycle_id)
            raise
        if outcome == "lost":  # the expiry is committed; this report had no cycle left
            self.on_cycles_changed()
            raise ConflictError(
                f"cycle {match.sequence} expired: the node restarted and its running sums "
                "(durability 'cycle') were lost; ask for a new cycle"
            )
        if outcome in ("completed", "closing"):
            self.cycles.forget_sums(cycle_id)
            self.on_cycles_changed()
        elif isinstance(outcome, agg.RunningSums):
            self.cycles.keep_sums(cycle_id, outcome)
        return _messages.ReportResponse().to_json()

    def _fold_report(self, conn: Connection, match, spec: agg.ModelSpec, diff, req):
        """Inside the report's transaction: fold the diff in, mark the seat reported, and
        complete the cycle when it is ready. Returns ``"completed"``, ``"lost"`` (durability
        ``"cycle"``: the sums were lost, the cycle expired instead), ``"held"`` (folded into
        in-memory sums), ``"closing"`` (ready, waiting for other processes' partial sums)
        or the stored :class:`RunningSums` (durability ``"report"``)."""
        cycle_id = match.cycle_id
        cycle = lock_existing_cycle(conn, cycle_id)
        if cycle.status != "open" or cycle.closing_at is not None:
            now_is = "closing" if cycle.status == "open" else f"closed ({cycle.status})"
            raise ConflictError(f"cycle {cycle.sequence} is {now_is}: the report came too late")
        if storage.seat_reported_at(conn, match.id) is not None:
            raise ConflictError(f"this worker already reported for cycle {cycle.sequence}")
        process = self.catalog.process(conn, cycle.process_id)
        if process.server_config.get("secure_aggregation") is not None:
            raise InvalidRequestError(
                "this FL process runs secure aggregation: a diff is never sent in the "
                f"clear; send it through {_messages.SECURE_AGGREGATION} (the gridfl "
                "worker SDK does this in job.report)"
            )
        in_memory = process.server_config.get("durability") == "cycle"
        if in_memory:
            sums = self.cycles.live_sums(conn, cycle, spec)
            if sums is None:  # lost with a crash: the cycle starts over
                self.cycles.expire_lost(conn, cycle, process, time.time())
                return "lost"
        else:
            sums = self.cycles.load_sums(conn, cycle_id, spec)
        self.catalog.strategy(conn, process.id).fold(sums, diff, req.num_samples)
        if in_memory:  # the database counts what this process's sums must hold
            self.cycles.partials.count(conn, cycle_id, sums.count_w + sums.count_x)
        else:
            self.cycles.store_sums(conn, cycle_id, sums)
        now = time.time()
        storage.mark_reported(conn, match.id, now, req.num_samples, req.metrics)
        received = cycle.num_reports + 1
        storage.count_report(conn, cycle_id, received)
        self.cycles.crash_point("report")
        if rules.ready(
            process.server_config,
            received=received,
            accepted=lambda: storage.count_seats(conn, cycle_id),
            end_at=cycle.end_at,
            now=now,
        ):
            if in_memory:
                return self.cycles.close_ready(conn, cycle, process, spec, received, now)
            self.cycles.complete(conn, cycle, process, sums)
            return "completed"
        return "held" if in_memory else sums
