"""``server_config.durability: "cycle"`` with three real ``gridfl serve`` processes on one
PostgreSQL database: each process folds the reports it takes into its own partial sums in
memory, and they are combined once when the cycle closes (docs/scaling.md). Workers are
spread over the processes. ``kill -9`` of a process that took reports loses its partial:
the cycle expires when the others have written theirs and the dead one's does not arrive,
reopens on the same checkpoint, and the next checkpoint is the mean of the reports made
after it, each once. The expected checkpoints are numpy means written from the rule in
gridfl.server.aggregate's docstring."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from gridfl.server.tables import cycle_partials
from tests._faultkit import assert_mean_applied, wait_until
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, join, report

pytestmark = pytest.mark.postgres

N = 6  # reports per cycle, two through each of the three processes
CLOSE_TIMEOUT = 10.0  # gridfl serve's default --close-timeout


def _start(serve_factory, db: str, count: int = 3):
    servers = [serve_factory(db, wait=False) for _ in range(count)]
    for s in servers:
        s.ready()
    return servers


def _host(url: str) -> None:
    # two seats more than reports: a cycle that is ready still has seats to refuse
    sc = {"max_workers": N + 2, "max_diffs": N, "durability": "cycle", "cycle_length": 300,
          "num_cycles": 5}
    r = Admin(url).host(host_payload(server_config=sc))
    assert r.status_code == 201, r.text


def _cycles(admin: Admin) -> list[tuple[int, str, int]]:
    return sorted((c["sequence"], c["status"], c["reported"]) for c in admin.status()["cycles"])


def _checkpoints(admin: Admin) -> list[int]:
    return [c["number"] for c in admin.status()["checkpoints"]]


def _partial_rows(db: str) -> int:
    eng = sa.create_engine(db)
    try:
        with eng.connect() as c:
            return c.execute(sa.select(sa.func.count()).select_from(cycle_partials)).scalar_one()
    finally:
        eng.dispose()


def test_three_processes_combine_their_partial_sums_once(serve_factory, pg_fresh_db):
    """Reports 0-3 carry num_samples, 4 and 5 do not, and each process takes two of them
    (a weighted and, on two processes, an unweighted one): the checkpoint is the mixed
    weighted mean, which needs every process's sums on both sides, each added once."""
    servers = _start(serve_factory, pg_fresh_db)
    _host(servers[0].url)
    workers = [HttpWorker(s.url) for s in servers]
    samples = [10, 20, 30, 40, None, None]
    joined = [join(workers[(i + 1) % 3]) for i in range(N)]  # seated by another process
    for i, (wid, cyc) in enumerate(joined):
        extra = {} if samples[i] is None else {"num_samples": samples[i]}
        st, body = report(workers[i % 3], wid, cyc["request_key"], diff_of(i), **extra)
        assert st == 200, body
    admin = Admin(servers[2].url)
    wait_until(lambda: _checkpoints(admin) == [1, 2], 30, "checkpoint 2")
    assert _cycles(admin) == [(1, "completed", N), (2, "open", 0)]
    assert _partial_rows(pg_fresh_db) == 0  # dropped with the cycle

    # the rule: a report without num_samples weighs the mean num_samples of the others
    weights = [float(n) for n in samples if n is not None]
    mean_weight = sum(weights) / len(weights)
    w = [mean_weight if n is None else float(n) for n in samples]
    base, new = model_params(), admin.checkpoint(2)
    for j, p in enumerate(base):
        total = sum(w[i] * diff_of(i)[j].astype(np.float64) for i in range(N))
        np.testing.assert_allclose(new[j], p - total / sum(w), rtol=1e-5, atol=1e-6)


def test_kill9_of_a_process_that_took_reports_expires_the_cycle(serve_factory, pg_fresh_db):
    servers = _start(serve_factory, pg_fresh_db)
    _host(servers[0].url)
    a, b, c = (HttpWorker(s.url) for s in servers)
    joined = [join((a, b, c)[i % 3]) for i in range(N)]
    for i in range(2):  # process c takes two reports in memory, then dies
        assert report(c, *_key(joined[i]), diff_of(i))[0] == 200
    c.close()
    servers[2].kill9()
    for i in range(2, N):  # the cycle fills through a and b
        assert report((a, b)[i % 2], *_key(joined[i]), diff_of(i))[0] == 200

    admin = Admin(servers[0].url)
    # ready, waiting for c's partial sums: no new seat meanwhile, only a time to come back
    _, cyc = join(b)
    assert (cyc["status"], cyc["reason"]) == ("rejected", "the cycle is closing"), cyc
    assert cyc["timeout"] is not None
    wait_until(lambda: [s for _, s, _ in _cycles(admin)] == ["expired", "open"],
               CLOSE_TIMEOUT + 20, "the cycle to expire")
    assert _cycles(admin) == [(1, "expired", N), (2, "open", 0)]
    assert _checkpoints(admin) == [1]  # reopened on the same checkpoint
    assert _partial_rows(pg_fresh_db) == 0

    servers[2].start()  # back, with a new instance and nothing in memory
    c = HttpWorker(servers[2].url)
    after = [join((a, b, c)[i % 3]) for i in range(N)]
    for i, joined_now in enumerate(after):
        assert report((a, b, c)[(i + 1) % 3], *_key(joined_now), diff_of(10 + i))[0] == 200
    wait_until(lambda: _checkpoints(admin) == [1, 2], 30, "checkpoint 2")
    assert _cycles(admin) == [(1, "expired", N), (2, "completed", N), (3, "open", 0)]
    # exactly the reports made after the crash, each once
    assert_mean_applied(admin.checkpoint(2), model_params(), [diff_of(10 + i) for i in range(N)])


def _key(joined) -> tuple[str, str]:
    wid, cyc = joined
    assert cyc["status"] == "accepted", cyc
    return wid, cyc["request_key"]


def test_an_averaging_plan_is_refused_on_postgresql(serve_factory, pg_fresh_db):
    """A running plan average cannot be combined from several processes' parts."""
    (srv,) = _start(serve_factory, pg_fresh_db, 1)
    sc = {"max_diffs": N, "durability": "cycle", "iterative_plan": True}
    r = Admin(srv.url).host(host_payload(server_config=sc, avg_plan=True))
    assert r.status_code == 400, r.text
    assert "durability 'cycle' with an averaging plan needs a single server" in r.json()["error"]
    assert Admin(srv.url).http.get("/gridfl/v1/processes/mnist/1.0").status_code == 404
