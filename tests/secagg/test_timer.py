"""Stage timeouts on the node's deadline timer (a live node, uvicorn on loopback, SQLite
and PostgreSQL): workers go silent mid-stage and no message arrives at all, yet the stage
closes ``stage_timeout`` after it opened. With enough survivors the cycle moves on and
completes once with their sum (numpy reference); with too few it expires, and the node
keeps nothing but the reason."""

from __future__ import annotations

import time

import numpy as np
import pytest
import sqlalchemy as sa

from gridfl.secagg import SecAggParams
from gridfl.secagg import messages as m
from gridfl.secagg.quantize import encode
from gridfl.server import tables
from tests.builders import diff_of, host_payload
from tests.harness import Admin
from tests.secagg._drive import Driver, assert_weighted_mean_step

# long enough for three survivors to answer the unmask stage in turn on a loaded CI
# machine (at 1 s it closed before them there, with 0 shares)
TIMEOUT = 3.0
CONFIG = {
    "max_workers": 4,
    "max_diffs": 4,
    "cycle_length": 120,  # far beyond the stage timeouts: only the stage timer can act
    "secure_aggregation": {"threshold": 3, "clipping_range": 0.5, "stage_timeout": TIMEOUT},
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def live(request, server_factory):
    db = None if request.param == "sqlite" else request.getfixturevalue("pg_fresh_db")
    node = server_factory(db)
    admin = Admin(node.url)
    assert admin.host(host_payload(server_config=CONFIG)).status_code == 201
    return node, admin


def _round(node):
    with node.node.engine.connect() as conn:
        return conn.execute(sa.select(tables.secagg_rounds)).one()


def _wait_until(check, within: float):
    """Poll ``check`` (reads only; no worker message) until it is truthy or ``within``
    seconds passed; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, "the stage did not close on time"
        time.sleep(0.05)
    return time.monotonic() - start


def _through(workers, stage: str, diffs=None) -> None:
    """Every driver in ``workers`` sends its message for ``stage`` (advertise .. masked)."""
    for i, w in enumerate(workers):
        if stage == m.ADVERTISE:
            w.ok(m.ADVERTISE, w.session.advertise().to_json())
        elif stage == m.SHARE:
            roster = m.Roster.from_json(w.wait_for(m.SHARE)["message"])
            w.ok(m.SHARE, w.session.share_keys(roster).to_json())
        else:
            forwarded = m.EncryptedShares.from_json(w.wait_for(m.MASKED)["message"])
            vec = encode(diffs[i], 3 + i, w.session.params)
            w.ok(m.MASKED, w.session.masked_vector(forwarded, vec).to_json())


def test_a_silent_worker_does_not_hold_the_stage_past_its_timeout(live):
    node, admin = live
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    workers = [Driver(node.url, params) for _ in range(4)]
    diffs = [diff_of(i) for i in range(4)]
    _through(workers, m.ADVERTISE)
    _through(workers, m.SHARE)
    survivors = workers[:3]  # the fourth goes silent before its masked input
    _through(survivors, m.MASKED, diffs)
    opened = _round(node).stage_at
    took = _wait_until(lambda: _round(node).stage == m.UNMASK, within=TIMEOUT + 5)
    row = _round(node)
    # closed by the timer, not before the timeout, and without any worker message
    assert row.stage_at - opened >= TIMEOUT, (row.stage_at, opened)
    assert took < TIMEOUT + 5
    with node.node.engine.connect() as conn:
        masked = conn.execute(
            sa.select(tables.secagg_messages.c.worker_id).where(
                tables.secagg_messages.c.stage == m.MASKED
            )
        ).scalars().all()
    assert sorted(masked) == sorted(w.wid for w in survivors)
    assert admin.status()["cycles"][0]["status"] == "open"

    for w in survivors:
        assert workers[3].wid in w.answer_unmask().dropped
    cycles = admin.status()["cycles"]
    assert [c["status"] for c in cycles].count("completed") == 1, cycles
    # numpy reference: the num_samples-weighted mean of the survivors' clipped diffs
    original, new = admin.checkpoint(ref=1), admin.checkpoint()
    assert_weighted_mean_step(original, new, diffs[:3], [3, 4, 5], params)
    # the timer does not touch the finished round again
    time.sleep(TIMEOUT + 0.5)
    assert _round(node).stage == "done"
    cycles = admin.status()["cycles"]
    assert [c["status"] for c in cycles].count("completed") == 1, cycles
    assert all(np.array_equal(a, b) for a, b in zip(admin.checkpoint(), new, strict=True))


@pytest.mark.parametrize("vanish_at", [m.SHARE, m.MASKED, m.UNMASK])
def test_when_every_worker_vanishes_the_cycle_expires_on_time(live, vanish_at):
    node, admin = live
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    workers = [Driver(node.url, params) for _ in range(4)]
    before = admin.checkpoint()
    done = m.STAGES[: m.STAGES.index(vanish_at)]
    for stage in done:
        _through(workers, stage, [diff_of(i) for i in range(4)])
    took = _wait_until(
        lambda: admin.status()["cycles"][0]["status"] != "open", within=TIMEOUT + 5
    )
    assert took < TIMEOUT + 5
    status = admin.status()
    assert status["cycles"][0]["status"] == "expired", status
    # nothing aggregated, nothing revealed: the round keeps only why it ended
    assert all(np.array_equal(a, b) for a, b in zip(admin.checkpoint(), before, strict=True))
    row = _round(node)
    assert row.stage == "aborted" and row.due_at is None
    with node.node.engine.connect() as conn:  # the masked sum is gone too
        assert conn.execute(sa.select(tables.secagg_totals)).all() == []
    assert set(row.state) == {"reason", "session"}
    assert "aborted" in row.state["reason"]
    # a worker that comes back late is told the round ended, and changes nothing
    st, reply = workers[0].send(vanish_at)
    assert st == 200 and reply["status"] == "aborted", reply
