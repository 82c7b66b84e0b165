"""A server optimizer's state across crashes: ``gridfl serve`` with FedAdam killed with
SIGKILL mid-cycle, between cycles, and inside the completion transaction, on SQLite and
PostgreSQL; then 3 server processes on one PostgreSQL database taking reports at once.
Every checkpoint equals the paper's FedAdam on the same reports (tests/_strategy_reference.py)
and the stored state is the one written with the newest checkpoint, its step count the
number of checkpoints written since hosting: no step applied twice, none lost."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa

from gridfl.server.tables import checkpoints, strategy_states
from tests import _strategy_reference as ref
from tests.builders import host_payload, model_params
from tests.harness import Admin, HttpWorker, join, report
from tests.server.test_strategy_node import ADAM, adam_cycles

HYPER = {k: v for k, v in ADAM.items() if k != "name"}
N = 3  # reports per cycle


def _committed(url: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(checkpoint numbers, (checkpoint number, step) of each stored state), read directly."""
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            numbers = c.execute(
                sa.select(checkpoints.c.number).order_by(checkpoints.c.number)
            ).scalars().all()
            states = c.execute(
                sa.select(checkpoints.c.number, strategy_states.c.step)
                .select_from(
                    strategy_states.join(
                        checkpoints, checkpoints.c.id == strategy_states.c.checkpoint_id
                    )
                )
                .order_by(checkpoints.c.number)
            ).all()
            return numbers, [tuple(s) for s in states]
    finally:
        eng.dispose()


def _host(url: str, num_cycles: int = 3) -> None:
    sc = {"max_diffs": N, "num_cycles": num_cycles, "strategy": ADAM}
    assert Admin(url).host(host_payload(server_config=sc)).status_code == 201


def _join(url: str, n: int = N):
    w = HttpWorker(url)
    return w, [join(w) for _ in range(n)]


def _report_all(url: str, reports, joined=None, start: int = 0) -> None:
    w, joined = (HttpWorker(url), joined) if joined is not None else _join(url, len(reports))
    for (wid, cyc), (diff, n) in list(zip(joined, reports, strict=True))[start:]:
        st, body = report(w, wid, cyc["request_key"], diff, num_samples=n)
        assert st == 200, body
    w.close()


def _assert_matches_reference(url: str, cycles) -> None:
    admin = Admin(url)
    for number, params in enumerate(ref.fedadam(model_params(), cycles, **HYPER), start=2):
        ref.assert_params_close(admin.checkpoint(number), params)


def test_kill9_mid_cycle_and_between_cycles(serve_factory, fault_db):
    cycles = adam_cycles(3)
    srv = serve_factory(fault_db)
    _host(srv.url)
    _report_all(srv.url, cycles[0])
    srv.kill9()  # between cycles: step 1 is stored with checkpoint 2
    assert _committed(fault_db) == ([1, 2], [(2, 1)])

    srv.start()
    w, joined = _join(srv.url)
    for (wid, cyc), (diff, n) in list(zip(joined, cycles[1], strict=True))[:2]:
        assert report(w, wid, cyc["request_key"], diff, num_samples=n)[0] == 200
    w.close()
    srv.kill9()  # mid-cycle: 2 of 3 reports folded, no step taken
    assert _committed(fault_db) == ([1, 2], [(2, 1)])

    srv.start()
    _report_all(srv.url, cycles[1], joined, start=2)
    _report_all(srv.url, cycles[2])
    assert _committed(fault_db) == ([1, 2, 3, 4], [(4, 3)])
    _assert_matches_reference(srv.url, cycles)
    assert Admin(srv.url).status()["strategy"]["state"]["step"] == 3


def test_crash_inside_the_step_applies_it_exactly_once(serve_factory, fault_db):
    """Cycle 2's completion dies after writing checkpoint 3 and its state, before commit:
    neither survives, and the last report, sent again, takes the step once."""
    cycles = adam_cycles(3)
    srv = serve_factory(fault_db)
    _host(srv.url)
    _report_all(srv.url, cycles[0])
    srv.kill9()
    srv.start(env={"GRIDFL_TEST_CRASH_AT": "aggregate"})
    w, joined = _join(srv.url)
    for (wid, cyc), (diff, n) in list(zip(joined, cycles[1], strict=True))[:2]:
        assert report(w, wid, cyc["request_key"], diff, num_samples=n)[0] == 200
    (wid, cyc), (diff, n) = joined[2], cycles[1][2]
    with pytest.raises(httpx.TransportError):
        report(w, wid, cyc["request_key"], diff, num_samples=n)
    w.close()
    assert srv.wait() == 137
    assert _committed(fault_db) == ([1, 2], [(2, 1)])

    srv.start(env={})
    _report_all(srv.url, cycles[1], joined, start=2)
    _report_all(srv.url, cycles[2])
    assert _committed(fault_db) == ([1, 2, 3, 4], [(4, 3)])
    _assert_matches_reference(srv.url, cycles)


@pytest.mark.postgres
def test_three_server_processes_apply_each_step_once(serve_factory, pg_fresh_db):
    """Workers join through one process and report through all three at once."""
    cycles = adam_cycles(3, per_cycle=6)
    servers = [serve_factory(pg_fresh_db) for _ in range(3)]
    sc = {"max_diffs": 6, "num_cycles": 3, "strategy": ADAM}
    assert Admin(servers[0].url).host(host_payload(server_config=sc)).status_code == 201
    for c, reports in enumerate(cycles):
        w, joined = _join(servers[c % 3].url, len(reports))
        w.close()

        def send(i, joined=joined, reports=reports):
            worker = HttpWorker(servers[i % 3].url)
            (wid, cyc), (diff, n) = joined[i], reports[i]
            try:
                return report(worker, wid, cyc["request_key"], diff, num_samples=n)[0]
            finally:
                worker.close()

        with ThreadPoolExecutor(len(reports)) as pool:
            assert list(pool.map(send, range(len(reports)))) == [200] * len(reports)
    assert _committed(pg_fresh_db) == ([1, 2, 3, 4], [(4, 3)])
    _assert_matches_reference(servers[1].url, cycles)
