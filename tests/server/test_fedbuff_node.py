"""Buffered asynchronous aggregation on a real node (uvicorn on loopback, SQLite and
PostgreSQL): workers join and report at different staleness, a worker asks again in the
buffer it reported to, a too-stale report is refused with the aggregate untouched, and
each published checkpoint equals a plain-numpy FedBuff (tests/_fedbuff_reference.py)."""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa

from gridfl import state
from gridfl.server.tables import aggregates, cycles
from tests import _fedbuff_reference as ref
from tests import _strategy_reference as sref
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, join, report

SC = {"mode": "async", "buffer_size": 3, "max_staleness": 2, "num_cycles": 0}
#: host_payload's synchronous defaults, dropped
NO_SYNC = {"cycle_length": None, "max_diffs": None}


class Script:
    """Workers of one async process, and the arrivals the reference replays."""

    def __init__(self, url: str) -> None:
        self.w = HttpWorker(url)
        self.admin = Admin(url)
        self.seats: dict[str, tuple[str, str, int]] = {}  # name -> (worker id, key, version)
        self.arrivals: list[tuple[list[np.ndarray], int]] = []
        self.published = 0
        self.seed = 0

    def join(self, name: str) -> None:
        wid, cyc = join(self.w)
        assert cyc["status"] == "accepted", cyc
        self.seats[name] = (wid, cyc["request_key"], self.published)

    def ask_again(self, name: str) -> None:
        wid, _, _ = self.seats[name]
        st, cyc = self.w.call(
            "model-centric/cycle-request", {"worker_id": wid, "model": "mnist", "version": "1.0"}
        )
        assert st == 200 and cyc["status"] == "accepted", cyc
        self.seats[name] = (wid, cyc["request_key"], self.published)

    def model_of(self, name: str) -> list[np.ndarray]:
        wid, key, _ = self.seats[name]
        r = self.w.get("get-model", worker_id=wid, request_key=key, model_id=1)
        assert r.status_code == 200, r.text
        return state.loads(r.content)

    def report(self, name: str) -> None:
        wid, key, version = self.seats[name]
        self.seed += 1
        diff = diff_of(self.seed)
        st, body = report(self.w, wid, key, diff)
        assert st == 200, body
        self.arrivals.append((diff, version))
        if len(self.arrivals) % SC["buffer_size"] == 0:
            self.published += 1


def test_reports_at_different_staleness_match_fedbuff(server_factory, db_url):
    srv = server_factory(db_url)
    admin = Admin(srv.url)
    assert admin.host(host_payload(server_config={**SC, **NO_SYNC})).status_code == 201
    s = Script(srv.url)
    for n in ("a", "b", "c", "d", "e", "late"):
        s.join(n)  # all on checkpoint 1
    s.report("a"), s.report("b"), s.report("c")  # buffer 1: staleness 0 -> checkpoint 2
    # a seat outlives its buffer: d's checkpoint (1) is still downloadable
    sref.assert_params_close(s.model_of("d"), model_params())
    s.join("f")  # on checkpoint 2
    s.report("d")  # staleness 1
    s.ask_again("a")  # on checkpoint 2
    s.report("a")
    s.ask_again("a")  # the same buffer again: a new key for the same seat
    sref.assert_params_close(s.model_of("a"), admin.checkpoint(2))
    s.report("a")  # buffer 2 -> checkpoint 3
    s.join("g")  # on checkpoint 3
    s.report("e")  # staleness 2: the limit, accepted
    s.report("f")  # staleness 1
    s.report("g")  # staleness 0 -> checkpoint 4
    # "late" trained on checkpoint 1: 3 checkpoints stale, over max_staleness 2
    eng = sa.create_engine(srv.db_url)
    try:
        with eng.connect() as c:
            before = c.execute(sa.select(aggregates)).all()
            open_now = sa.select(cycles).where(cycles.c.status == "open")
            open_before = c.execute(open_now).one()
        wid, key, _ = s.seats["late"]
        st, body = report(s.w, wid, key, diff_of(99))
        assert st == 409, body
        text = str(body)
        assert "3 checkpoints stale" in text and "max_staleness is 2" in text, text
        with eng.connect() as c:
            assert c.execute(sa.select(aggregates)).all() == before
            assert c.execute(open_now).one() == open_before
    finally:
        eng.dispose()
    s.ask_again("late")  # on checkpoint 4
    s.join("h")
    s.report("late"), s.report("h")
    s.ask_again("b")
    s.report("b")  # -> checkpoint 5
    want = ref.fedbuff(model_params(), s.arrivals, buffer_size=SC["buffer_size"])
    assert len(want) == 4
    for number, params in enumerate(want, start=2):
        sref.assert_params_close(admin.checkpoint(number), params)
    st = admin.status()
    assert st["status"] == "running"


def test_a_report_counts_once_and_an_old_key_is_refused(server_factory, db_url):
    srv = server_factory(db_url)
    admin = Admin(srv.url)
    assert admin.host(host_payload(server_config={**SC, **NO_SYNC})).status_code == 201
    s = Script(srv.url)
    s.join("a")
    wid, old_key, _ = s.seats["a"]
    s.report("a")
    st, body = report(s.w, wid, old_key, diff_of(50))
    assert st == 409 and "already reported" in str(body), body
    s.ask_again("a")
    st, body = report(s.w, wid, old_key, diff_of(51))  # replaced by the new key
    assert st == 401, body
    s.report("a"), s.join("b"), s.report("b")  # -> checkpoint 2
    want = ref.fedbuff(model_params(), s.arrivals, buffer_size=3)
    sref.assert_params_close(admin.checkpoint(2), want[0])


def test_async_fedadam_steps_on_the_buffered_mean(server_factory, db_url):
    """A server optimizer in async mode: each published buffer is one FedAdam step whose
    pseudo-gradient is (1/K) sum s(tau_k) diff_k; its moments persist with the checkpoint."""
    adam = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    srv = server_factory(db_url)
    admin = Admin(srv.url)
    sc = {**SC, **NO_SYNC, "strategy": {"name": "fedadam", **adam}}
    assert admin.host(host_payload(server_config=sc)).status_code == 201
    s = Script(srv.url)
    for n in ("a", "b", "c", "d"):
        s.join(n)
    s.report("a"), s.report("b"), s.report("c")  # -> checkpoint 2
    s.join("e"), s.join("f")
    s.report("d"), s.report("e"), s.report("f")  # d one stale -> checkpoint 3
    cycles = []
    for version in range(2):  # buffer b is folded while checkpoint b + 1 is the latest
        reports = []
        for diff, trained_at in s.arrivals[3 * version : 3 * version + 3]:
            w = 1 / np.sqrt(1 + version - trained_at)
            reports.append(([w * x for x in diff], 1))
        cycles.append(reports)
    for number, params in enumerate(sref.fedadam(model_params(), cycles, **adam), start=2):
        sref.assert_params_close(admin.checkpoint(number), params, rtol=1e-4)
    assert admin.status()["strategy"]["state"]["step"] == 2
