"""gridfl's long-polled cycle request (``wait``): a worker moves to the next cycle the
moment it opens, without sleeping for the rejection timeout and asking again."""

from __future__ import annotations

import threading
import time

import pytest

from tests.builders import ADMIN, diff_of, host_payload, reset_postgres_schema
from tests.harness import Admin, HttpWorker, WsWorker, join, report


def _worker(server, kind):
    return HttpWorker(server.url) if kind == "http" else WsWorker(server.url, server.ws_url)


def _held(fn) -> tuple[threading.Thread, dict]:
    """Run ``fn`` (a request that may be held) in a thread: the dict gets its ``reply``
    and how many ``seconds`` it took."""
    out: dict = {}

    def run():
        started = time.monotonic()
        out["reply"] = fn()
        out["seconds"] = time.monotonic() - started

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _report_ok(worker, worker_id, cycle, diff) -> None:
    status, body = report(worker, worker_id, cycle["request_key"], diff)
    assert status == 200, body


def _answered_soon_after(act, *held: tuple[threading.Thread, dict], within: float = 2.0):
    """Check that the held requests are still waiting, run ``act`` (what should answer
    them), and check that they all came back within ``within`` seconds of it."""
    time.sleep(0.5)
    assert not any("reply" in out for _, out in held), "a request was not held"
    started = time.monotonic()
    act()
    for t, out in held:
        t.join(timeout=25)
        assert "reply" in out, "still held 25 s later"
    took = time.monotonic() - started
    assert took < within, f"answered {took:.1f} s later, not at once"


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

    t, held = _held(
        lambda: a.call(
            "model-centric/cycle-request",
            {"worker_id": wid_a, "model": "mnist", "version": "1.0", "wait": 20},
        )
    )
    _answered_soon_after(lambda: _report_ok(b, wid_b, cyc_b, diff_of(1)), (t, held))
    status, reply = held["reply"]
    assert status == 200 and reply["status"] == "accepted", reply
    assert admin.status()["current"]["sequence"] == 2
    a.close()
    b.close()


def test_wait_runs_out_with_the_usual_rejection(in_process_node):
    """Nothing opens: after ``wait`` seconds the rejection (with its timeout) comes back."""
    admin = Admin(in_process_node.url)
    cfg = {"max_workers": 1, "max_diffs": 1, "cycle_length": 600}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(in_process_node.url)
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
def test_bad_wait_is_refused(in_process_node, wait):
    admin = Admin(in_process_node.url)
    assert admin.host(host_payload()).status_code == 201
    w = HttpWorker(in_process_node.url)
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
    reset_postgres_schema(pg_database)
    a = server_factory(pg_database, long_poll_recheck=30)
    b = server_factory(pg_database, long_poll_recheck=30)
    admin = Admin(a.url)
    cfg = {"max_workers": 1, "max_diffs": 1, "num_cycles": 3, "cycle_length": 600}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    on_a, on_b = HttpWorker(a.url), HttpWorker(b.url)
    wid_a, cyc_a = join(on_a)
    _st, auth = on_b.call("model-centric/authenticate", {"model_name": "mnist"})
    t, held = _held(
        lambda: on_b.call(
            "model-centric/cycle-request",
            {"worker_id": auth["worker_id"], "model": "mnist", "version": "1.0", "wait": 20},
        )
    )
    try:
        # answered by A's NOTIFY, not B's 30 s recheck
        _answered_soon_after(
            lambda: _report_ok(on_a, wid_a, cyc_a, diff_of(0)), (t, held)
        )
        status, reply = held["reply"]
        assert status == 200 and reply["status"] == "accepted", reply
        assert admin.status()["current"]["sequence"] == 2
    finally:
        t.join(timeout=25)
        on_a.close()
        on_b.close()


# ---------------------------------------------------------------- held status (admin API)
def test_held_status_answers_when_the_next_cycle_closes(server):
    """``wait`` with no ``after``: the status is held until a cycle newer than the newest
    closed one closes (here: the worker's report completes cycle 1), then answered at once
    with it; asked again with ``after`` behind the newest, it answers without holding."""
    from gridfl.host import HostClient

    admin = Admin(server.url)
    cfg = {"max_workers": 1, "max_diffs": 1, "num_cycles": 3, "cycle_length": 600}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(server.url)
    wid, cyc = join(w)
    with HostClient(server.url, admin_token=ADMIN, timeout=5) as host:
        # the client's 5 s read timeout is stretched for a 20 s hold
        t, held = _held(lambda: host.status("mnist", "1.0", cycles=5, wait=20))
        _answered_soon_after(lambda: _report_ok(w, wid, cyc, diff_of(0)), (t, held))
        cycles = {c["sequence"]: c["status"] for c in held["reply"]["cycles"]}
        assert cycles == {1: "completed", 2: "open"}, held["reply"]
        started = time.monotonic()
        again = host.status("mnist", "1.0", wait=20, after=0)
        assert time.monotonic() - started < 1.0
        assert again["cycles"][0]["status"] == "completed"
    w.close()


def test_held_status_runs_out_with_the_usual_status(in_process_node):
    admin = Admin(in_process_node.url)
    assert admin.host(host_payload(server_config={"cycle_length": 600})).status_code == 201
    started = time.monotonic()
    r = admin.http.get("/gridfl/v1/processes/mnist/1.0", params={"wait": 1.5, "after": 0})
    took = time.monotonic() - started
    assert r.status_code == 200 and r.json()["current"]["sequence"] == 1, r.text
    assert 1.4 <= took < 4


def test_stop_answers_held_requests_at_once(server_factory):
    """Stopping a process wakes what is held for it: a status waiting for a cycle to close
    and a worker's cycle request waiting for a seat come back at once, the request
    rejected with no timeout, as for any stopped process. (The node's own recheck is set to
    30 s here, so only the stop's own wake-up can answer them in time.)"""
    server = server_factory(long_poll_recheck=30)
    admin = Admin(server.url)
    cfg = {"max_workers": 1, "max_diffs": 1, "cycle_length": 600}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    a, b = HttpWorker(server.url), HttpWorker(server.url)
    join(a)
    _st, auth = b.call("model-centric/authenticate", {"model_name": "mnist"})
    t_status, status = _held(
        lambda: admin.http.get("/gridfl/v1/processes/mnist/1.0", params={"wait": 20})
    )
    t_cycle, cycle = _held(
        lambda: b.call(
            "model-centric/cycle-request",
            {"worker_id": auth["worker_id"], "model": "mnist", "wait": 20},
        )
    )
    _answered_soon_after(
        lambda: admin.http.post("/gridfl/v1/processes/mnist/1.0/stop").raise_for_status(),
        (t_status, status),
        (t_cycle, cycle),
        within=3.0,
    )
    assert status["reply"].json()["status"] == "stopped"
    code, reply = cycle["reply"]
    assert code == 200 and reply["status"] == "rejected" and "timeout" not in reply, reply
    a.close()
    b.close()


@pytest.mark.parametrize(
    "params, key",
    [
        ({"wait": -1}, "wait"),
        ({"wait": 61}, "wait"),
        ({"wait": "soon"}, "wait"),
        ({"wait": "nan"}, "wait"),
        ({"wait": 1, "after": -1}, "after"),
        ({"after": "two"}, "after"),
    ],
)
def test_bad_held_status_parameters_are_refused(in_process_node, params, key):
    admin = Admin(in_process_node.url)
    assert admin.host(host_payload()).status_code == 201
    r = admin.http.get("/gridfl/v1/processes/mnist/1.0", params=params)
    assert r.status_code == 400 and r.json()["error"].startswith(f"{key} must be"), r.text


@pytest.mark.postgres
def test_status_held_by_another_process_answers_when_the_process_finishes(server_factory,
                                                                            pg_database):
    """Two server processes on one PostgreSQL database, each looking for the other's
    cycles only every 30 s: a status held by node B comes back right after node A's report
    completes the process's last cycle (no next cycle opens; A announces the finish)."""
    reset_postgres_schema(pg_database)
    a = server_factory(pg_database, long_poll_recheck=30)
    b = server_factory(pg_database, long_poll_recheck=30)
    admin_a, admin_b = Admin(a.url), Admin(b.url)
    cfg = {"max_workers": 1, "max_diffs": 1, "num_cycles": 1, "cycle_length": 600}
    assert admin_a.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(a.url)
    wid, cyc = join(w)
    t, held = _held(
        lambda: admin_b.http.get("/gridfl/v1/processes/mnist/1.0", params={"wait": 20})
    )
    try:
        # answered by A's NOTIFY of the finish, not B's 30 s recheck
        _answered_soon_after(lambda: _report_ok(w, wid, cyc, diff_of(0)), (t, held))
        assert held["reply"].json()["status"] == "finished"
    finally:
        t.join(timeout=25)
        w.close()
