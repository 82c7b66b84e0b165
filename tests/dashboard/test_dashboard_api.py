"""The dashboard's API without a browser, on a live node: sign-in and its cookie, what is
refused without a session or from another origin, and that the admin API still takes the
bearer token."""

from __future__ import annotations

import io
import logging
from http.cookies import SimpleCookie

import httpx
import numpy as np
import pytest

from gridfl import state
from gridfl.server.dashboard import COOKIE, SESSION_SECONDS, check_session, new_session
from tests.builders import ADMIN


def _client(node, origin: str | None = "self") -> httpx.Client:
    headers = {"origin": node.url if origin == "self" else origin} if origin else {}
    return httpx.Client(base_url=node.url, headers=headers, timeout=30)


def _sign_in(http: httpx.Client, token: str = ADMIN) -> httpx.Response:
    return http.post("/dashboard/api/session", json={"token": token})


def test_sign_in_sets_a_strict_httponly_expiring_cookie(live):
    with _client(live) as http:
        assert _sign_in(http, "not-the-token").status_code == 401
        assert COOKIE not in http.cookies
        r = _sign_in(http)
        assert r.status_code == 200, r.text
        morsel = SimpleCookie(r.headers["set-cookie"])[COOKIE]
        assert morsel["httponly"] is True
        assert morsel["samesite"] == "strict"
        assert morsel["path"] == "/dashboard"
        assert int(morsel["max-age"]) == SESSION_SECONDS
        assert ADMIN not in r.headers["set-cookie"]
        assert http.get("/dashboard/api/processes").status_code == 200
        # sign-out clears the cookie and this server refuses the old value from now on
        old = http.cookies[COOKIE]
        r = http.delete("/dashboard/api/session")
        assert r.status_code == 200
        assert 'max-age=0' in r.headers["set-cookie"].lower()
        http.cookies.set(COOKIE, old, domain="127.0.0.1", path="/dashboard")
        assert http.get("/dashboard/api/processes").status_code == 401


def test_api_answers_401_without_a_session(live):
    name = live.host()
    paths = ["session", "node", "processes", f"processes/{name}/1.0",
             f"processes/{name}/1.0/checkpoints/latest"]
    with _client(live) as http:
        for path in paths:
            r = http.get(f"/dashboard/api/{path}")
            assert r.status_code == 401, path
            assert "sign in" in r.json()["error"]
        # a forged cookie (signed with another token) is no session either
        forged, _ = new_session("another-token")
        http.cookies.set(COOKIE, forged, domain="127.0.0.1", path="/dashboard")
        assert http.get("/dashboard/api/processes").status_code == 401
        assert http.post(f"/dashboard/api/processes/{name}/1.0/stop").status_code == 401
        assert http.delete(f"/dashboard/api/processes/{name}/1.0").status_code == 401
    assert live.status(name)["status"] == "running"


@pytest.mark.parametrize("origin", [None, "http://evil.example", "null"])
def test_changes_from_another_origin_are_refused(live, origin):
    name = live.host()
    with _client(live) as good:
        assert _sign_in(good).status_code == 200
        with _client(live, origin=origin) as other:
            other.cookies = good.cookies  # even with a valid session
            assert other.post(f"/dashboard/api/processes/{name}/1.0/stop").status_code == 403
            assert other.delete(f"/dashboard/api/processes/{name}/1.0").status_code == 403
            assert _sign_in(other).status_code == 403
    assert live.status(name)["status"] == "running"


def test_session_expires_and_is_bound_to_the_token():
    value, expires = new_session("tok", now=1000)
    assert expires == 1000 + SESSION_SECONDS
    assert check_session(value, "tok", now=expires - 1) == expires
    assert check_session(value, "tok", now=expires) is None  # expired
    assert check_session(value, "other", now=1001) is None  # the token changed
    body, mac = value.rsplit(".", 1)
    tampered = f"{int(body.split('.')[0]) + 10**6}.{body.split('.')[1]}.{mac}"
    assert check_session(tampered, "tok", now=1001) is None


def test_admin_api_still_takes_the_bearer_token(driven):
    live, name, driver = driven
    driver.close_cycle(loss=0.5, accuracy=0.25)
    bearer = {"authorization": f"Bearer {ADMIN}"}
    with _client(live) as http:
        assert http.get("/gridfl/v1/processes", headers=bearer).status_code == 200
        # the bearer token does not open the dashboard API, nor a cookie the admin API
        assert http.get("/dashboard/api/processes", headers=bearer).status_code == 401
        _sign_in(http)
        assert http.get("/gridfl/v1/processes").status_code == 401
        admin_bytes = http.get(f"/gridfl/v1/processes/{name}/1.0/checkpoints/2",
                               headers=bearer).content
        got = http.get(f"/dashboard/api/processes/{name}/1.0/checkpoints/2")
        assert got.status_code == 200
        assert got.content == admin_bytes
        assert 'filename="' in got.headers["content-disposition"]
        npz = np.load(io.BytesIO(
            http.get(f"/dashboard/api/processes/{name}/1.0/checkpoints/2?format=npz").content))
        for i, arr in enumerate(state.loads(admin_bytes)):
            np.testing.assert_array_equal(npz[f"param_{i}"], arr)
        bad = http.get(f"/dashboard/api/processes/{name}/1.0/checkpoints/2?format=zip")
        assert bad.status_code == 400 and "format" in bad.json()["error"]


def test_process_reply_masks_secrets_and_lists_workers(live):
    name = live.host(server_config={"authentication": {"secret": "hunter2"}})
    with _client(live) as http:
        _sign_in(http)
        r = http.get(f"/dashboard/api/processes/{name}/1.0")
        assert r.status_code == 200
        assert "hunter2" not in r.text
        assert r.json()["server_config"]["authentication"]["secret"] == "***"
        assert r.json()["workers"] == []
        node = http.get("/dashboard/api/node").json()
        assert node["database"]["kind"] == "sqlite" and node["database"]["healthy"] is True
        assert node["memory"]["rss_mb"] > 10


def test_token_never_logged(live, caplog):
    caplog.set_level(logging.DEBUG)
    with _client(live) as http:
        _sign_in(http, "wrong-" + ADMIN)
        _sign_in(http)
        http.get("/dashboard/api/processes")
    assert ADMIN not in caplog.text


@pytest.mark.postgres
def test_node_page_lists_the_server_processes_on_postgresql(server_factory, pg_fresh_db):
    first, second = server_factory(pg_fresh_db), server_factory(pg_fresh_db)
    with _client(first) as http:
        _sign_in(http)
        db = http.get("/dashboard/api/node").json()["database"]
    assert db["kind"] == "postgresql" and db["healthy"] is True
    # both nodes (threads of this test process) hold one LISTEN session each
    assert len(db["server_processes"]) == 2, db
    assert second.node.engine.dialect.name == "postgresql"


def test_page_and_vendored_files_are_served_from_the_package(live):
    with _client(live, origin=None) as http:
        r = http.get("/dashboard")
        assert r.status_code == 308 and r.headers["location"] == "/dashboard/"
        page = http.get("/dashboard/")
        assert page.status_code == 200 and "<title>gridfl dashboard</title>" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        for path in ("app.js", "app.css", "vendor/uplot/uPlot.iife.min.js",
                     "vendor/uplot/LICENSE"):
            assert http.get(f"/dashboard/static/{path}").status_code == 200, path
        assert "MIT" in http.get("/dashboard/static/vendor/uplot/LICENSE").text
        # nothing outside the static directory
        assert http.get("/dashboard/static/%2e%2e/dashboard.py").status_code == 404


def test_processes_request_is_held_until_a_cycle_changes(driven):
    import threading
    import time

    live, name, driver = driven
    with _client(live) as http:
        _sign_in(http)
        first = http.get("/dashboard/api/processes").json()
        seen = first["generation"]
        started = time.monotonic()
        quiet = http.get(f"/dashboard/api/processes?wait=0.5&after={seen}").json()
        assert time.monotonic() - started >= 0.5 and quiet["generation"] == seen
        timer = threading.Timer(0.3, driver.close_cycle, kwargs={"loss": 0.4})
        timer.start()
        started = time.monotonic()
        woken = http.get(f"/dashboard/api/processes?wait=20&after={seen}").json()
        timer.join()
        assert time.monotonic() - started < 10 and woken["generation"] > seen
        (entry,) = woken["processes"]
        assert entry["name"] == name and entry["current_cycle"] == 2


def test_dp_process_shows_its_epsilon_and_strategy(live):
    from tests.dashboard.conftest import CycleDriver

    dp = {"noise_multiplier": 1.0, "clip_norm": 0.5, "population_size": 1000,
          "max_epsilon": 100.0}
    name = live.host(server_config={"max_diffs": 1, "max_workers": 1, "cycle_length": 600,
                                    "differential_privacy": dp})
    driver = CycleDriver(live, name)
    try:
        driver.close_cycle(loss=0.5)
        driver.close_cycle(loss=0.4)
    finally:
        driver.close()
    admin = live.status(name)
    with _client(live) as http:
        _sign_in(http)
        (entry,) = http.get("/dashboard/api/processes").json()["processes"]
        page = http.get(f"/dashboard/api/processes/{name}/1.0").json()
    # the figures the admin API reports, passed through
    assert entry["epsilon"] == admin["privacy"]["epsilon"] > 0
    assert entry["strategy"] == admin["strategy"]["name"]
    spent = [c["epsilon"] for c in page["cycles"] if c["status"] == "completed"]
    assert len(spent) == 2 and 0 < spent[0] < spent[1]  # ε grows cycle by cycle


def test_cycle_counts_the_requests_it_rejected(live):
    from tests.harness import HttpWorker, join

    name = live.host(server_config={"minimum_download_speed": 50, "max_diffs": 5})
    speeds = {"ping": 5.0, "upload": 20.0}
    worker = HttpWorker(live.url)
    try:
        answers = [join(worker, name, download=d, **speeds)[1]["status"] for d in (90, 5, 1)]
    finally:
        worker.close()
    assert answers == ["accepted", "rejected", "rejected"]
    with _client(live) as http:
        _sign_in(http)
        (cycle,) = http.get(f"/dashboard/api/processes/{name}/1.0").json()["cycles"]
    assert (cycle["accepted"], cycle["reported"], cycle["rejected"]) == (1, 0, 2)
    assert live.status(name)["cycles"][0]["rejected"] == 2  # the admin API says the same


def test_rejections_from_a_full_cycle_are_counted_too(live):
    """Requests for a full cycle are turned away on a read-only path; they are counted
    with the next admission to that cycle that writes (here a request carrying its speed
    test)."""
    from tests.harness import HttpWorker, join

    name = live.host(server_config={"max_workers": 1, "max_diffs": 5})
    worker = HttpWorker(live.url)
    try:
        answers = [join(worker, name)[1]["status"] for _ in range(4)]
        answers.append(join(worker, name, ping=5.0, download=50.0, upload=20.0)[1]["status"])
    finally:
        worker.close()
    assert answers == ["accepted"] + ["rejected"] * 4
    (cycle,) = live.status(name)["cycles"]
    assert (cycle["accepted"], cycle["rejected"]) == (1, 4)


def test_rejections_from_a_full_cycle_are_counted_when_it_closes(live):
    """The last cycle of a process sees no later admission: its read-only rejections are
    written when it completes."""
    from tests.harness import HttpWorker, join, report

    name = live.host(server_config={"max_workers": 1, "max_diffs": 1, "num_cycles": 1})
    zeros = [np.zeros_like(p) for p in live.checkpoint(name, 1)]
    worker = HttpWorker(live.url)
    try:
        wid, cycle = join(worker, name)
        answers = [join(worker, name)[1]["status"] for _ in range(3)]
        status, _ = report(worker, wid, cycle["request_key"], zeros)
    finally:
        worker.close()
    assert answers == ["rejected"] * 3 and status == 200
    (closed,) = live.status(name)["cycles"]
    assert closed["status"] == "completed"
    assert (closed["accepted"], closed["rejected"]) == (1, 3)
