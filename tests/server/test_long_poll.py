"""gridfl's long-polled cycle request (``wait``): a worker moves to the next cycle the
moment it opens, without sleeping for the rejection timeout and asking again."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import Admin, HttpWorker, WsWorker, diff_of, host_payload, join, report


def _worker(server, kind):
    return HttpWorker(server.url) if kind == "http" else WsWorker(server.url, server.ws_url)


@pytest.mark.parametrize("kind", ["http", "ws"])
def test_held_request_is_accepted_as_soon_as_the_next_cycle_opens(server, kind):
    """Worker A is in cycle 1 and asks again with wait=20; it is held, and accepted into
    cycle 2 right after worker B's report closes cycle 1 (long before the 600 s deadline)."""
    admin = Admin(server.url)
    cfg = {"max_workers": 2, "max_diffs": 2, "num_cycles": 3, "cycle_length": 600}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    a, b = _worker(server, kind), _worker(server, kind)
    wid_a, cyc_a = join(a)
    wid_b, cyc_b = join(b)
    assert report(a, wid_a, cyc_a["request_key"], diff_of(0))[0] == 200

    held: dict = {}

    def ask_again():
        started = time.monotonic()
        held["reply"] = a.call(
            "model-centric/cycle-request",
            {"worker_id": wid_a, "model": "mnist", "version": "1.0", "wait": 20},
        )
        held["seconds"] = time.monotonic() - started

    t = threading.Thread(target=ask_again)
    t.start()
    time.sleep(0.5)
    assert "reply" not in held, "the request was not held"
    closed_at = time.monotonic()
    assert report(b, wid_b, cyc_b["request_key"], diff_of(1))[0] == 200
    t.join(timeout=10)
    status, reply = held["reply"]
    assert status == 200 and reply["status"] == "accepted", reply
    assert time.monotonic() - closed_at < 2.0
    assert admin.status()["current"]["sequence"] == 2
    a.close()
    b.close()


def test_wait_runs_out_with_the_usual_rejection(server):
    """Nothing opens: after ``wait`` seconds the rejection (with its timeout) comes back."""
    admin = Admin(server.url)
    cfg = {"max_workers": 1, "max_diffs": 1, "cycle_length": 600}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(server.url)
    wid, _ = join(w)
    started = time.monotonic()
    status, reply = w.call(
        "model-centric/cycle-request", {"worker_id": wid, "model": "mnist", "wait": 1.5}
    )
    took = time.monotonic() - started
    assert status == 200 and reply["status"] == "rejected" and reply["timeout"] > 500, reply
    assert 1.4 <= took < 4
    w.close()


@pytest.mark.parametrize("wait", [-1, 61, "soon", True])
def test_bad_wait_is_refused(server, wait):
    admin = Admin(server.url)
    assert admin.host(host_payload()).status_code == 201
    w = HttpWorker(server.url)
    st, auth = w.call("model-centric/authenticate", {"model_name": "mnist"})
    st, reply = w.call(
        "model-centric/cycle-request",
        {"worker_id": auth["worker_id"], "model": "mnist", "wait": wait},
    )
    assert st == 400 and "'wait'" in reply["error"], reply
    w.close()


@pytest.mark.postgres
def test_cycle_opened_by_another_process_wakes_held_requests_at_once(server_factory,
                                                                     pg_database):
    """Two server processes on one PostgreSQL database, each looking for other processes'
    cycles only every 30 s: a request held by node B is still accepted right after node A
    opens the next cycle, because A announces it (NOTIFY) and B listens."""
    from conftest import _reset_pg

    _reset_pg(pg_database)
    a = server_factory(pg_database, long_poll_recheck=30)
    b = server_factory(pg_database, long_poll_recheck=30)
    admin = Admin(a.url)
    cfg = {"max_workers": 1, "max_diffs": 1, "num_cycles": 3, "cycle_length": 600}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    on_a, on_b = HttpWorker(a.url), HttpWorker(b.url)
    wid_a, cyc_a = join(on_a)
    st, auth = on_b.call("model-centric/authenticate", {"model_name": "mnist"})
    held: dict = {}

    def ask():
        started = time.monotonic()
        held["reply"] = on_b.call(
            "model-centric/cycle-request",
            {"worker_id": auth["worker_id"], "model": "mnist", "version": "1.0", "wait": 20},
        )
        held["seconds"] = time.monotonic() - started

    t = threading.Thread(target=ask)
    t.start()
    try:
        time.sleep(0.5)
        assert "reply" not in held, "the request was not held"
        opened_at = time.monotonic()
        assert report(on_a, wid_a, cyc_a["request_key"], diff_of(0))[0] == 200
        t.join(timeout=25)
        assert "reply" in held, "the held request did not come back within its wait"
        status, reply = held["reply"]
        assert status == 200 and reply["status"] == "accepted", reply
        assert time.monotonic() - opened_at < 2.0, "woken by the 30 s recheck, not the NOTIFY"
        assert admin.status()["current"]["sequence"] == 2
    finally:
        t.join(timeout=25)
        on_a.close()
        on_b.close()
