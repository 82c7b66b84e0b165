"""Crash faults with real processes: ``gridfl serve`` killed with SIGKILL (or dying inside a
transaction through the test-only ``GRIDFL_TEST_CRASH_AT`` hook) and restarted on the same
SQLite file or PostgreSQL database. Nothing reported is lost, nothing is counted twice,
no partial checkpoint survives, and each cycle is aggregated exactly once."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from gridfl.server.tables import aggregates, checkpoints, cycles
from tests._faultkit import assert_mean_applied, wait_until
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, join, report


def _db_state(url: str) -> dict:
    """What is committed in the database, read directly (no server involved)."""
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return {
                "checkpoints": c.execute(
                    sa.select(checkpoints.c.number).order_by(checkpoints.c.number)
                ).scalars().all(),
                "cycles": c.execute(
                    sa.select(cycles.c.sequence, cycles.c.status, cycles.c.num_reports).order_by(
                        cycles.c.sequence
                    )
                ).all(),
                "aggregates": c.execute(
                    sa.select(aggregates.c.count_x, aggregates.c.count_w)
                ).all(),
            }
    finally:
        eng.dispose()


def _join_all(url: str, n: int):
    w = HttpWorker(url)
    return w, [join(w) for _ in range(n)]


def test_kill9_after_k_of_n_reports(serve_factory, fault_db, k=2):
    """SIGKILL after k of n=4 reports; restart; the other n-k report; checkpoint 2 is
    current - mean of exactly the n diffs; the k reported before the crash cannot report
    again."""
    n = 4
    srv = serve_factory(fault_db)
    assert Admin(srv.url).host(host_payload(server_config={"max_diffs": n})).status_code == 201
    w, joined = _join_all(srv.url, n)
    for i in range(k):
        wid, cyc = joined[i]
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    w.close()
    srv.kill9()
    assert _db_state(fault_db)["cycles"] == [(1, "open", k)]

    srv.start()
    w = HttpWorker(srv.url)
    for i in range(k):  # already counted: refused, not counted twice
        wid, cyc = joined[i]
        st, body = report(w, wid, cyc["request_key"], diff_of(i))
        assert st == 409 and "already reported" in body["error"], body
    for i in range(k, n):
        wid, cyc = joined[i]
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    admin = Admin(srv.url)
    st = admin.status()
    assert [(c["sequence"], c["status"], c["reported"]) for c in st["cycles"]] == [
        (1, "completed", n),
        (2, "open", 0),
    ]
    assert [c["number"] for c in st["checkpoints"]] == [1, 2]
    assert_mean_applied(admin.checkpoint(2), model_params(), [diff_of(i) for i in range(n)])


def test_crash_inside_report_transaction_stores_nothing(serve_factory, fault_db):
    """The node dies after folding a report in but before commit: after restart the report
    is not there (not half-stored) and the same worker reports again with the same key."""
    srv = serve_factory(fault_db, env={"GRIDFL_TEST_CRASH_AT": "report"})
    assert Admin(srv.url).host(host_payload(server_config={"max_diffs": 2})).status_code == 201
    w, joined = _join_all(srv.url, 2)
    wid, cyc = joined[0]
    with pytest.raises(httpx.TransportError):
        report(w, wid, cyc["request_key"], diff_of(0))
    assert srv.wait() == 137
    state = _db_state(fault_db)
    assert state["cycles"] == [(1, "open", 0)]
    assert state["aggregates"] in ([], [(0, 0)])

    srv.start(env={})
    w = HttpWorker(srv.url)
    for i, (wid, cyc) in enumerate(joined):
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    assert_mean_applied(Admin(srv.url).checkpoint(2), model_params(), [diff_of(0), diff_of(1)])


def test_crash_during_aggregation_runs_it_exactly_once(serve_factory, fault_db):
    """The node dies inside the completion transaction (new checkpoint row written, cycle
    marked completed, not committed). After restart no partial checkpoint exists, the
    cycle is still open with the reports before the last one, and the last report
    completes it: exactly one checkpoint 2 = current - mean of the 3 diffs."""
    srv = serve_factory(fault_db, env={"GRIDFL_TEST_CRASH_AT": "aggregate"})
    assert Admin(srv.url).host(host_payload(server_config={"max_diffs": 3})).status_code == 201
    w, joined = _join_all(srv.url, 3)
    for i in range(2):
        wid, cyc = joined[i]
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    wid, cyc = joined[2]
    with pytest.raises(httpx.TransportError):  # the completing report: the node dies
        report(w, wid, cyc["request_key"], diff_of(2))
    assert srv.wait() == 137
    state = _db_state(fault_db)
    assert state["checkpoints"] == [1]  # no partial checkpoint
    assert state["cycles"] == [(1, "open", 2)]
    assert state["aggregates"] == [(2, 0)]

    srv.start(env={})
    w = HttpWorker(srv.url)
    assert report(w, wid, cyc["request_key"], diff_of(2))[0] == 200
    state = _db_state(fault_db)
    assert state["checkpoints"] == [1, 2]
    assert state["cycles"] == [(1, "completed", 3), (2, "open", 0)]
    new = Admin(srv.url).checkpoint(2)
    assert_mean_applied(new, model_params(), [diff_of(i) for i in range(3)])


def test_crash_during_deadline_aggregation_runs_it_exactly_once(serve_factory, fault_db):
    """The deadline timer's aggregation crashes the node; after restart the timer finds the
    overdue cycle and aggregates it once, with the reports it had."""
    srv = serve_factory(fault_db, env={"GRIDFL_TEST_CRASH_AT": "aggregate"})
    payload = host_payload(server_config={"max_diffs": 10, "cycle_length": 2})
    assert Admin(srv.url).host(payload).status_code == 201
    w, joined = _join_all(srv.url, 3)
    for i in range(2):  # the third worker vanishes
        wid, cyc = joined[i]
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    assert srv.wait(timeout=20) == 137  # the timer closed the cycle at its deadline: crash
    state = _db_state(fault_db)
    assert state["checkpoints"] == [1]
    assert state["cycles"] == [(1, "open", 2)]

    srv.start(env={})
    admin = Admin(srv.url)
    wait_until(lambda: admin.status()["cycles"][0]["status"] == "completed", 10, "cycle 1")
    state = _db_state(fault_db)
    assert state["checkpoints"] == [1, 2]
    assert [c[:2] for c in state["cycles"]] == [(1, "completed"), (2, "open")]
    assert_mean_applied(admin.checkpoint(2), model_params(), [diff_of(0), diff_of(1)])
