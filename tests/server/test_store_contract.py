"""Storage contract: the same scenarios on SQLite and PostgreSQL, through GridNode directly
(and a live server for restarts). In CI a missing PostgreSQL fails instead of skipping."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import sqlalchemy as sa

from gridfl import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    _messages,
    state,
)
from gridfl.server import GridNode
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, join, make_settings
from tests.harness import report as http_report


@pytest.fixture
def node(db_url, tmp_path):
    n = GridNode(make_settings(db_url, tmp_path))
    yield n
    n.close()


def _join(node: GridNode, name="mnist"):
    auth = node.authenticate(_messages.AuthenticateRequest(model_name=name))
    cyc = node.cycle_request(_messages.CycleRequest(worker_id=auth["worker_id"], model=name))
    return auth["worker_id"], cyc


def _report(node, wid, cyc, seed, **kw):
    return node.report(
        _messages.ReportRequest(wid, cyc["request_key"], state.dumps(diff_of(seed)), **kw)
    )


def test_migrations_create_schema_and_are_idempotent(node, db_url, tmp_path):
    tables = set(sa.inspect(node.engine).get_table_names())
    assert {
        "processes",
        "plans",
        "checkpoints",
        "cycles",
        "workers",
        "worker_cycles",
        "aggregates",
        "alembic_version",
    } <= tables
    GridNode(make_settings(db_url, tmp_path)).close()  # second upgrade: no-op


def test_downgrade_to_0001_puts_the_latest_alias_back(node, db_url, tmp_path):
    """Since 0002 "latest" is the highest number and the alias column is not written;
    revision 0001 looks "latest" up by alias, so the downgrade sets it on each process's
    newest checkpoint (and nowhere else), and upgrading again works."""
    from alembic import command

    from gridfl.server import db
    from gridfl.server.tables import checkpoints, processes

    node.host(host_payload(server_config={"max_diffs": 1, "num_cycles": 3}))
    node.host(host_payload(name="other"))
    for seed in range(2):
        wid, cyc = _join(node)
        _report(node, wid, cyc, seed)
    cfg = db.alembic_config()
    with node.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    with node.engine.connect() as conn:
        rows = conn.execute(
            sa.select(processes.c.name, checkpoints.c.number, checkpoints.c.alias)
            .join(processes, processes.c.id == checkpoints.c.process_id)
            .order_by(processes.c.name, checkpoints.c.number)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("mnist", 1, None), ("mnist", 2, None), ("mnist", 3, "latest"), ("other", 1, "latest")]
    db.migrate(node.engine)
    assert node.checkpoint("mnist", "1.0", "latest") == node.checkpoint("mnist", "1.0", 3)


def test_host_is_atomic_and_conflicts(node):
    bad = host_payload()
    bad["plans"] = {"training_plan": "bm90IG9ubng="}  # "not onnx"
    with pytest.raises(InvalidRequestError):
        node.host(bad)
    assert node.list_processes() == []
    node.host(host_payload())
    with pytest.raises(ConflictError):
        node.host(host_payload())
    assert len(node.list_processes()) == 1


def test_cycle_aggregates_on_both_backends(node):
    node.host(host_payload(server_config={"max_diffs": 3}))
    joined = [_join(node) for _ in range(3)]
    for i, (wid, cyc) in enumerate(joined):
        _report(node, wid, cyc, i, num_samples=i + 1)
    new = state.loads(node.checkpoint("mnist", "1.0", "latest"))
    for j, p in enumerate(model_params()):
        mean = sum((i + 1) * diff_of(i)[j].astype(np.float64) for i in range(3)) / 6
        np.testing.assert_allclose(new[j], p - mean, rtol=1e-6, atol=1e-7)
    st = node.status("mnist", "1.0")
    assert st["cycles"][0]["status"] == "completed" and st["current"]["sequence"] == 2


@pytest.mark.parametrize("durability", ["report", "cycle"])
def test_a_report_records_its_samples_and_metrics(node, durability):
    """The report's seat row (written on the driver's cursor, db.Prepared) keeps what the
    worker said of itself, JSON metrics included, on both backends."""
    node.host(host_payload(server_config={"max_diffs": 2, "durability": durability}))
    joined = [_join(node) for _ in range(2)]
    _report(node, *joined[0], 0, num_samples=10, metrics={"loss": 0.5, "accuracy": 0.75})
    _report(node, *joined[1], 1)  # no samples and no metrics: NULL, left out of the means
    with pytest.raises(ConflictError, match="already reported"):
        _report(node, *joined[1], 1)
    cycle = node.status("mnist", "1.0")["cycles"][0]
    assert cycle["status"] == "completed" and cycle["reported"] == 2
    assert cycle["num_samples"] == 10
    assert cycle["metrics"] == {"loss": 0.5, "accuracy": 0.75}


def test_a_worker_with_many_seats_is_found_by_any_of_its_keys(node):
    """A report's lookup reads the worker's newest seats first and all of them only when
    none matches: an old key still gets its own answer."""
    from gridfl.server.worker_api import _RECENT_SEATS

    node.host(host_payload(server_config={"max_diffs": 1, "num_cycles": 0}))
    auth = node.authenticate(_messages.AuthenticateRequest(model_name="mnist"))
    wid, cycles = auth["worker_id"], []
    for seed in range(_RECENT_SEATS + 3):
        cyc = node.cycle_request(_messages.CycleRequest(worker_id=wid, model="mnist"))
        cycles.append(cyc)
        _report(node, wid, cyc, seed)
    with pytest.raises(ConflictError, match=r"already reported for cycle 1$"):
        _report(node, wid, cycles[0], 0)
    with pytest.raises(ConflictError, match=rf"already reported for cycle {len(cycles)}$"):
        _report(node, wid, cycles[-1], 0)
    with pytest.raises(AuthenticationError):
        _report(node, wid, {"request_key": "0" * 64}, 0)
    newest = node.cycle_request(_messages.CycleRequest(worker_id=wid, model="mnist"))
    _report(node, wid, newest, 1)
    assert node.status("mnist", "1.0")["current"]["sequence"] == len(cycles) + 2


def test_held_requests_are_admitted_together(node, monkeypatch):
    """admit_held answers each request as cycle_request would, in order, in one write
    transaction; a request that fails (even after writing) leaves no trace, and the
    others keep their seats."""
    node.host(host_payload(server_config={"max_workers": 2, "max_diffs": 2}))
    wids = [node.authenticate(_messages.AuthenticateRequest(model_name="mnist"))["worker_id"]
            for _ in range(4)]
    reqs = [_messages.CycleRequest(worker_id=w, model="mnist") for w in wids]
    unknown = _messages.CycleRequest(worker_id="no-such-worker", model="mnist")

    real_admit = node._admit

    def admit(conn, req):  # the third worker's seat is written, then the request fails
        reply = real_admit(conn, req)
        if req.worker_id == wids[2]:
            raise RuntimeError("broke after writing")
        return reply

    monkeypatch.setattr(node, "_admit", admit)
    first, missing, broken, second, late = node.admit_held(
        [reqs[0], unknown, reqs[2], reqs[1], reqs[3]])
    assert first["status"] == "accepted" and second["status"] == "accepted"
    assert isinstance(missing, NotFoundError)
    assert isinstance(broken, RuntimeError)
    assert late["status"] == "rejected" and late["reason"] == "the cycle is full"
    current = node.status("mnist", "1.0")["current"]
    assert current["accepted"] == 2  # the broken request's seat was rolled back
    monkeypatch.undo()
    (again,) = node.admit_held([reqs[0]])
    assert again["reason"] == "already accepted into this cycle"
    # the keys work: both accepted workers report and the cycle completes
    _report(node, wids[0], first, 0)
    _report(node, wids[1], second, 1)
    assert node.status("mnist", "1.0")["current"]["sequence"] == 2


def test_checkpoint_rows_are_written_once(node):
    """Checkpoints are insert-only: no statement updates a checkpoint row (in SQLite an
    UPDATE rewrites the row's whole model blob), and "latest" is the highest number."""
    statements = []
    sa.event.listen(node.engine, "before_cursor_execute",
                    lambda conn, cur, sql, *a: statements.append(sql))
    node.host(host_payload(server_config={"max_diffs": 1, "num_cycles": 3}))
    for seed in range(3):
        wid, cyc = _join(node)
        _report(node, wid, cyc, seed)
    assert not [q for q in statements if q.lstrip().upper().startswith("UPDATE CHECKPOINTS")]
    assert [c["number"] for c in node.status("mnist", "1.0")["checkpoints"]] == [1, 2, 3, 4]
    assert [c["alias"] for c in node.status("mnist", "1.0")["checkpoints"]] == [
        None, None, None, "latest"]
    assert node.checkpoint("mnist", "1.0", "latest") == node.checkpoint("mnist", "1.0", 4)
    with pytest.raises(NotFoundError, match="has no checkpoint 'best'"):
        node.checkpoint("mnist", "1.0", "best")


def test_exactly_once_completion_under_concurrency(node):
    node.host(host_payload(server_config={"max_diffs": 4, "num_cycles": 0}))
    joined = [_join(node) for _ in range(10)]
    barrier = threading.Barrier(10)

    def go(i):
        barrier.wait()
        try:
            _report(node, *joined[i], i)
            return "ok"
        except ConflictError:
            return "late"

    with ThreadPoolExecutor(10) as ex:
        results = list(ex.map(go, range(10)))
    assert results.count("ok") == 4 and results.count("late") == 6
    st = node.status("mnist", "1.0")
    assert [c["number"] for c in st["checkpoints"]] == [1, 2]
    assert st["cycles"][0]["reported"] == 4


def test_two_nodes_one_database(db_url, tmp_path):
    """Two server processes' worth of GridNode on one database: still exactly once."""
    a = GridNode(make_settings(db_url, tmp_path))
    b = GridNode(make_settings(db_url, tmp_path))
    try:
        a.host(host_payload(server_config={"max_diffs": 4}))
        joined = [_join(a if i % 2 else b) for i in range(6)]
        with ThreadPoolExecutor(6) as ex:
            list(ex.map(lambda i: _safe_report(a if i % 2 else b, *joined[i], i), range(6)))
        st = a.status("mnist", "1.0")
        assert [c["number"] for c in st["checkpoints"]] == [1, 2]
        assert st["cycles"][0]["reported"] == 4
    finally:
        a.close()
        b.close()


def _safe_report(node, wid, cyc, i):
    with contextlib.suppress(ConflictError):
        _report(node, wid, cyc, i)


def test_reports_survive_a_new_node(db_url, tmp_path):
    """Restart (a new GridNode on the same database): the running aggregate is kept."""
    a = GridNode(make_settings(db_url, tmp_path))
    a.host(host_payload(server_config={"max_diffs": 2}))
    w1, c1 = _join(a)
    w2, c2 = _join(a)
    _report(a, w1, c1, 0)
    a.close()
    b = GridNode(make_settings(db_url, tmp_path))
    try:
        _report(b, w2, c2, 1)
        new = state.loads(b.checkpoint("mnist", "1.0", 2))
        for j, p in enumerate(model_params()):
            mean = (diff_of(0)[j] + diff_of(1)[j]) / 2
            np.testing.assert_allclose(new[j], p - mean, rtol=1e-6, atol=1e-7)
    finally:
        b.close()


def test_server_restart_mid_cycle_live(server_factory, db_url):
    """A live server stops mid-cycle; a new one on the same database finishes the cycle."""
    srv = server_factory(db_url)
    admin = Admin(srv.url)
    assert admin.host(host_payload(server_config={"max_diffs": 2})).status_code == 201
    w = HttpWorker(srv.url)
    wid1, c1 = join(w)
    wid2, c2 = join(w)
    assert http_report(w, wid1, c1["request_key"], diff_of(0))[0] == 200
    srv.stop()
    srv2 = server_factory(db_url)
    w2 = HttpWorker(srv2.url)
    st = Admin(srv2.url).status()
    assert st["current"]["accepted"] == 2 and st["current"]["reported"] == 1
    assert http_report(w2, wid2, c2["request_key"], diff_of(1))[0] == 200
    new = Admin(srv2.url).checkpoint()
    for j, p in enumerate(model_params()):
        mean = (diff_of(0)[j] + diff_of(1)[j]) / 2
        np.testing.assert_allclose(new[j], p - mean, rtol=1e-6, atol=1e-7)
