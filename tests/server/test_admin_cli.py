"""Admin API (hosting validation, status, checkpoints, stop/delete), limits, and `gridfl serve`
as a subprocess killed mid-cycle (SIGKILL) and restarted on the same database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from gridfl import state
from gridfl.cli import main
from tests.builders import ADMIN, b64, diff_of, host_payload, model_params, training_plan
from tests.harness import Admin, HttpWorker, WsWorker, free_port, join, report


def test_admin_token_required(server):
    r = httpx.get(server.url + "/gridfl/v1/processes")
    assert r.status_code == 401 and "admin token" in r.json()["error"]
    bad = Admin(server.url, token="wrong")
    assert bad.host(host_payload()).status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = httpx.get(server.url + "/model-centric/retrieve-model", params={"name": "mnist"})
    assert r.status_code == 401  # PG#629: no anonymous model download


@pytest.mark.parametrize(
    "mutate, status, text",
    [
        (lambda p: p["server_config"].update(bogus=1), 400, "unknown keys"),
        (lambda p: p["server_config"].update(max_workers="5"), 400, "max_workers"),
        (lambda p: p["server_config"].update(num_cycles=True), 400, "num_cycles"),
        (lambda p: p["server_config"].update(pool_selection="best"), 400, "pool_selection"),
        (lambda p: p["server_config"].update(min_diffs=5, max_diffs=2), 400, "max_diffs"),
        (lambda p: p["server_config"].update(authentication={"pub_key": "x"}), 400, "RSA"),
        (lambda p: p["client_config"].pop("version"), 400, "client_config.version"),
        (lambda p: p.update(model=b64(b"junk")), 400, "model"),
        (lambda p: p.update(model="***"), 400, "base64"),
        (lambda p: p.update(plans={}), 400, "plans"),
        (lambda p: p.update(plans={"t": {"pickle": "eA=="}}), 400, "variant"),
        (lambda p: p.update(plans={"t": b64(training_plan([(3, 3), (3,)]))}), 400, "shape"),
        (lambda p: p.update(averaging_plan=b64(training_plan())), 400, "averaging"),
        (lambda p: p.update(extra=1), 400, "unknown fields"),
    ],
)
def test_host_validation_stores_nothing(admin, mutate, status, text):
    payload = host_payload()
    mutate(payload)
    r = admin.host(payload)
    assert r.status_code == status and text in r.json()["error"], r.text
    assert admin.http.get("/gridfl/v1/processes").json() == {"processes": []}


def test_host_conflict_list_status_stop_delete(admin, server):
    assert admin.host(host_payload()).status_code == 201
    r = admin.host(host_payload())
    assert r.status_code == 409 and "already exists" in r.json()["error"]
    assert admin.host(host_payload(version="2.0")).status_code == 201
    procs = admin.http.get("/gridfl/v1/processes").json()["processes"]
    assert [(p["name"], p["version"]) for p in procs] == [("mnist", "1.0"), ("mnist", "2.0")]
    # no version: the latest one
    assert admin.http.get("/gridfl/v1/processes/mnist").json()["version"] == "2.0"
    st = admin.status()
    assert st["current"]["sequence"] == 1 and st["current"]["deadline_in"] > 0
    r = admin.http.get("/model-centric/retrieve-model", params={"name": "mnist", "version": "1.0"})
    assert r.status_code == 200
    np.testing.assert_array_equal(state.loads(r.content)[0], model_params()[0])
    assert admin.http.get("/gridfl/v1/processes/mnist/1.0/checkpoints/7").status_code == 404
    w = HttpWorker(server.url)
    wid, cyc = join(w)
    assert admin.http.post("/gridfl/v1/processes/mnist/1.0/stop").status_code == 200
    assert admin.status()["status"] == "stopped"
    _, again = join(w)
    assert again["status"] == "rejected" and "timeout" not in again
    st, _body = report(w, wid, cyc["request_key"], diff_of(0))
    assert st == 409
    assert admin.http.delete("/gridfl/v1/processes/mnist/1.0").status_code == 200
    assert admin.http.get("/gridfl/v1/processes/mnist/1.0").status_code == 404


def test_body_limits(server_factory):
    srv = server_factory(max_body_bytes=10_000)
    admin = Admin(srv.url)
    assert admin.host(host_payload()).status_code == 201
    w = HttpWorker(srv.url)
    wid, cyc = join(w)
    big = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]
    st, _body = report(w, wid, cyc["request_key"], big, metrics={"pad": 1.0}, junk="x" * 20_000)
    assert st == 413


def test_cli_help():
    r = CliRunner().invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "--database-url" in r.output and "--admin-token" in r.output


def _start(tmp_path, port, token_file):
    cmd = [
        sys.executable,
        "-c",
        "from gridfl.cli import main; main()",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "data"),
        "--admin-token-file",
        str(token_file),
        "--log-level",
        "warning",
    ]
    env = {k: v for k, v in os.environ.items() if k != "GRIDFL_DATABASE_URL"}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, "gridfl serve did not start"
        time.sleep(0.1)


def test_serve_killed_mid_cycle_loses_no_report(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN + "\n")
    port = free_port()
    proc, url = _start(tmp_path, port, token_file)
    try:
        admin = Admin(url)
        assert admin.host(host_payload(server_config={"max_diffs": 2})).status_code == 201
        w = HttpWorker(url)
        wid1, c1 = join(w)
        wid2, c2 = join(w)
        assert report(w, wid1, c1["request_key"], diff_of(0))[0] == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, url = _start(tmp_path, port, token_file)
    try:
        w = HttpWorker(url)
        assert report(w, wid2, c2["request_key"], diff_of(1))[0] == 200
        new = Admin(url).checkpoint()
        for j, p in enumerate(model_params()):
            mean = (diff_of(0)[j] + diff_of(1)[j]) / 2
            np.testing.assert_allclose(new[j], p - mean, rtol=1e-6, atol=1e-7)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_status_lists_the_latest_cycles_and_checkpoints(admin, server):
    assert (
        admin.host(host_payload(server_config={"max_diffs": 1, "num_cycles": 5})).status_code == 201
    )
    w = HttpWorker(server.url)
    for _ in range(3):  # three cycles, one report each
        wid, cyc = join(w)
        assert report(w, wid, cyc["request_key"], diff_of(0))[0] == 200
    full = admin.status()
    assert [c["sequence"] for c in full["cycles"]] == [1, 2, 3, 4]
    assert [c["number"] for c in full["checkpoints"]] == [1, 2, 3, 4]
    r = admin.http.get("/gridfl/v1/processes/mnist/1.0", params={"cycles": 2})
    assert r.status_code == 200, r.text
    last = r.json()
    assert [c["sequence"] for c in last["cycles"]] == [3, 4]
    assert [c["number"] for c in last["checkpoints"]] == [3, 4]
    assert last["cycles"][0]["result_checkpoint"] == 4 and last["current"]["sequence"] == 4
    for bad in ("0", "1001", "two", "-1", "²"):
        r = admin.http.get("/gridfl/v1/processes/mnist/1.0", params={"cycles": bad})
        assert r.status_code == 400 and "cycles must be an integer" in r.json()["error"], bad


def test_plan_of_a_deleted_process_is_not_found(admin, server):
    """The node caches plan metadata by id; a deleted process's plan must still answer
    'not found', not a cycle or key error from the stale entry."""
    assert admin.host(host_payload()).status_code == 201
    w = HttpWorker(server.url)
    wid, cyc = join(w)
    params = {
        "worker_id": wid,
        "request_key": cyc["request_key"],
        "plan_id": cyc["plans"]["training_plan"],
    }
    assert w.get("get-plan", **params).status_code == 200  # now cached
    assert admin.http.delete("/gridfl/v1/processes/mnist/1.0").status_code == 200
    r = w.get("get-plan", **params)
    assert r.status_code == 400 and r.json()["error"] == "Plan ID not found!", r.text


def test_serve_answers_held_requests_when_told_to_stop(tmp_path):
    """SIGTERM with requests held for a cycle (a status, a cycle request over HTTP and one
    over WebSocket, each with a 60 s wait): they are answered at once (the status as it
    is, the requests with their rejection and its timeout) and the node exits within
    seconds; uvicorn alone waits for them, a minute."""
    import threading

    token_file = tmp_path / "token"
    token_file.write_text(ADMIN + "\n")
    proc, url = _start(tmp_path, free_port(), token_file)
    replies: dict = {}
    try:
        admin = Admin(url)
        cfg = {"max_workers": 1, "cycle_length": 600}
        assert admin.host(host_payload(server_config=cfg)).status_code == 201
        join(HttpWorker(url))  # the cycle's one seat
        http_w, ws_w = HttpWorker(url), WsWorker(url, url.replace("http", "ws"))
        asks = {}
        for name, w in (("http", http_w), ("ws", ws_w)):
            wid = w.call("model-centric/authenticate", {"model_name": "mnist"})[1]["worker_id"]
            asks[name] = (w, {"worker_id": wid, "model": "mnist", "wait": 60})

        def held(name):
            if name == "status":
                r = admin.http.get("/gridfl/v1/processes/mnist/1.0", params={"wait": 60},
                                   timeout=90)
                replies[name] = r.status_code, r.json()
            else:
                w, body = asks[name]
                replies[name] = w.call("model-centric/cycle-request", body)

        threads = [threading.Thread(target=held, args=(n,)) for n in ("status", "http", "ws")]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert not replies, f"not held: {replies}"
        asked_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - asked_at
        for t in threads:
            t.join(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert took < 5, f"the node took {took:.1f} s to stop"
    assert replies["status"][0] == 200 and replies["status"][1]["status"] == "running"
    for name in ("http", "ws"):
        code, body = replies[name]
        assert code == 200 and body["status"] == "rejected" and body["timeout"] > 500, body
