"""``server_config.durability: "cycle"`` with real processes: the running sums live in the
node's memory only, so ``kill -9`` loses the open cycle's reports. After a restart that
cycle is expired and reopens on the same checkpoint; nothing from before the crash is
counted, and the next checkpoint is the mean of the reports made after it."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from gridfl.server.tables import aggregates
from tests._faultkit import assert_mean_applied
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, join, report

N = 3


def _host(url: str):
    return Admin(url).host(host_payload(server_config={"max_diffs": N, "durability": "cycle"}))


def test_kill9_mid_cycle_expires_it_and_counts_nothing_twice(serve_factory, tmp_path):
    db = f"sqlite:///{tmp_path / 'grid.db'}"
    srv = serve_factory(db)
    assert _host(srv.url).status_code == 201
    w = HttpWorker(srv.url)
    before = [join(w) for _ in range(N)]
    for i in range(2):  # two of three report, then the node dies
        wid, cyc = before[i]
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    w.close()
    eng = sa.create_engine(db)
    with eng.connect() as c:  # durability "cycle": no running sum was ever written
        assert c.execute(sa.select(sa.func.count()).select_from(aggregates)).scalar() == 0
    eng.dispose()
    srv.kill9()

    srv.start()
    admin = Admin(srv.url)
    st = admin.status()
    assert sorted((c["sequence"], c["status"]) for c in st["cycles"]) == [
        (1, "expired"),
        (2, "open"),
    ]
    assert [c["number"] for c in st["checkpoints"]] == [1]  # reopened on the same checkpoint
    w = HttpWorker(srv.url)
    wid, cyc = before[2]  # its cycle is gone: the report is refused, not counted
    st_code, body = report(w, wid, cyc["request_key"], diff_of(2))
    assert st_code == 409 and "expired" in body["error"], body
    after = [join(w) for _ in range(N)]
    for i, (wid, cyc) in enumerate(after):
        assert report(w, wid, cyc["request_key"], diff_of(10 + i))[0] == 200
    st = admin.status()
    assert [c["number"] for c in st["checkpoints"]] == [1, 2]
    # exactly the reports made after the restart, each once
    assert_mean_applied(admin.checkpoint(2), model_params(), [diff_of(10 + i) for i in range(N)])


def test_crash_inside_the_first_report_transaction_keeps_the_cycle(serve_factory, tmp_path):
    """The node dies after folding the cycle's first report in memory, before its commit:
    nothing was committed, so nothing is lost. The cycle stays open after the restart, the
    same worker reports again with its key, and the report counts once."""
    db = f"sqlite:///{tmp_path / 'grid.db'}"
    srv = serve_factory(db, env={"GRIDFL_TEST_CRASH_AT": "report"})
    assert _host(srv.url).status_code == 201
    w = HttpWorker(srv.url)
    joined = [join(w) for _ in range(N)]
    wid, cyc = joined[0]
    with pytest.raises(httpx.TransportError):  # the node dies mid-request
        report(w, wid, cyc["request_key"], diff_of(0))
    w.close()
    assert srv.wait() == 137
    srv.start(env={})
    w = HttpWorker(srv.url)
    for i, (wid, cyc) in enumerate(joined):
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    admin = Admin(srv.url)
    assert sorted((c["sequence"], c["status"]) for c in admin.status()["cycles"]) == [
        (1, "completed"),
        (2, "open"),
    ]
    assert_mean_applied(admin.checkpoint(2), model_params(), [diff_of(i) for i in range(N)])


def test_a_graceful_restart_expires_the_open_cycle_too(serve_factory, tmp_path):
    """The sums live in the process: a stop and start (an upgrade) drops them as a crash
    does, and the cycle that had reports reopens on its checkpoint."""
    db = f"sqlite:///{tmp_path / 'grid.db'}"
    srv = serve_factory(db)
    assert _host(srv.url).status_code == 201
    w = HttpWorker(srv.url)
    wid, cyc = join(w)
    assert report(w, wid, cyc["request_key"], diff_of(0))[0] == 200
    w.close()
    srv.stop()
    srv.start()
    st = Admin(srv.url).status()
    statuses = sorted((c["sequence"], c["status"], c["reported"]) for c in st["cycles"])
    assert statuses == [(1, "expired", 1), (2, "open", 0)]
