"""Buffered asynchronous aggregation across crashes: ``gridfl serve`` in ``mode: "async"``
killed with SIGKILL between buffers, mid-buffer, inside a report's transaction and inside
the publishing one, on SQLite and PostgreSQL; then 3 server processes on one PostgreSQL
database taking reports at once. No accepted report is lost or counted twice, each buffer
is published once, and every checkpoint equals a plain-numpy FedBuff
(tests/_fedbuff_reference.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from gridfl.server.tables import checkpoints, cycles
from tests import _fedbuff_reference as ref
from tests import _strategy_reference as sref
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, join, report

K = 3
SC = {"mode": "async", "buffer_size": K, "max_staleness": 5, "num_cycles": 0,
      "cycle_length": None, "max_diffs": None}


def _committed(url: str) -> tuple[list[int], list[tuple[str, int]]]:
    """(checkpoint numbers, (status, num_reports) of each cycle), read directly."""
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            numbers = c.execute(
                sa.select(checkpoints.c.number).order_by(checkpoints.c.number)
            ).scalars().all()
            rows = c.execute(
                sa.select(cycles.c.status, cycles.c.num_reports).order_by(cycles.c.sequence)
            ).all()
            return numbers, [tuple(r) for r in rows]
    finally:
        eng.dispose()


class Workers:
    """Seats taken through one node; the arrivals the reference replays."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[list[np.ndarray], int]] = []

    def join(self, url: str, count: int, version: int):
        w = HttpWorker(url)
        seats = [(*join(w), version) for _ in range(count)]
        w.close()
        return seats

    def send(self, url: str, seat, seed: int, *, expect: int = 200) -> None:
        (wid, cyc, version), diff = seat, diff_of(seed)
        w = HttpWorker(url)
        try:
            st, body = report(w, wid, cyc["request_key"], diff)
        finally:
            w.close()
        assert st == expect, body
        if st == 200:
            self.arrivals.append((diff, version))


def _assert_matches_reference(url: str, arrivals) -> None:
    admin = Admin(url)
    want = ref.fedbuff(model_params(), arrivals, buffer_size=K)
    for number, params in enumerate(want, start=2):
        sref.assert_params_close(admin.checkpoint(number), params)


def test_kill9_between_and_mid_buffer(serve_factory, fault_db):
    srv = serve_factory(fault_db)
    assert Admin(srv.url).host(host_payload(server_config=SC)).status_code == 201
    ws = Workers()
    first = ws.join(srv.url, 5, version=0)
    for i in range(3):
        ws.send(srv.url, first[i], i)
    srv.kill9()  # between buffers: buffer 1 published
    assert _committed(fault_db) == ([1, 2], [("completed", 3), ("open", 0)])

    srv.start()
    second = ws.join(srv.url, 2, version=1)
    ws.send(srv.url, first[3], 10)  # staleness 1
    ws.send(srv.url, second[0], 11)
    srv.kill9()  # mid-buffer: 2 reports folded and kept
    assert _committed(fault_db) == ([1, 2], [("completed", 3), ("open", 2)])

    srv.start()
    ws.send(srv.url, second[0], 11, expect=409)  # already counted before the crash
    ws.send(srv.url, first[4], 12)  # staleness 1: publishes buffer 2
    ws.send(srv.url, second[1], 13)
    assert _committed(fault_db) == ([1, 2, 3], [("completed", 3), ("completed", 3), ("open", 1)])
    _assert_matches_reference(srv.url, ws.arrivals)


@pytest.mark.parametrize("point", ["report", "aggregate"])
def test_crash_inside_a_report_loses_or_doubles_nothing(serve_factory, fault_db, point):
    """The report's transaction (``report``: a plain fold; ``aggregate``: the one that
    publishes) dies before its commit: nothing of it stays, and sent again it counts once."""
    srv = serve_factory(fault_db)
    assert Admin(srv.url).host(host_payload(server_config=SC)).status_code == 201
    ws = Workers()
    seats = ws.join(srv.url, 6, version=0)
    for i in range(K - 1):
        ws.send(srv.url, seats[i], i)
    srv.kill9()
    srv.start(env={"GRIDFL_TEST_CRASH_AT": point})
    w = HttpWorker(srv.url)
    victim = seats[K - 1]  # the buffer's K-th report: "aggregate" dies publishing it
    with pytest.raises(httpx.TransportError):
        report(w, victim[0], victim[1]["request_key"], diff_of(K - 1))
    w.close()
    assert srv.wait() == 137
    assert _committed(fault_db) == ([1], [("open", K - 1)])
    srv.start(env={})
    ws.send(srv.url, victim, K - 1)  # the same report again: accepted once
    ws.send(srv.url, victim, K - 1, expect=409)
    for i in range(K, 6):
        ws.send(srv.url, seats[i], i)  # staleness 1
    assert _committed(fault_db) == ([1, 2, 3], [("completed", K), ("completed", K), ("open", 0)])
    _assert_matches_reference(srv.url, ws.arrivals)


@pytest.mark.postgres
def test_three_server_processes_publish_each_buffer_once(serve_factory, pg_fresh_db):
    """18 workers on checkpoint 1 report through 3 processes at once. With a constant
    staleness weight the final model is x - (1/K) sum of all diffs however the reports
    fall into buffers, so it checks that each report counted exactly once; each buffer
    must hold exactly K reports and publish one checkpoint."""
    servers = [serve_factory(pg_fresh_db) for _ in range(3)]
    sc = {**SC, "staleness_weight": {"name": "constant"}, "max_staleness": 10}
    assert Admin(servers[0].url).host(host_payload(server_config=sc)).status_code == 201
    ws = Workers()
    seats = [s for i in range(3) for s in ws.join(servers[i].url, 6, version=0)]

    def send(i):
        ws.send(servers[i % 3].url, seats[i], i)

    with ThreadPoolExecutor(9) as pool:
        list(pool.map(send, range(len(seats))))
    numbers, rows = _committed(pg_fresh_db)
    assert numbers == list(range(1, 8))
    assert rows == [("completed", K)] * 6 + [("open", 0)]
    start = ref.flat(model_params())
    total = sum(ref.flat(d) for d, _ in ws.arrivals)
    want = ref.unflat(start - total / K, model_params())
    sref.assert_params_close(Admin(servers[2].url).checkpoint(7), want, rtol=1e-4, atol=1e-5)
