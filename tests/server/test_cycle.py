"""Whole cycles: concurrent workers, aggregation, deadlines, rules. The node runs in
process (no socket) except where WebSocket workers or the deadline timer of a served
node are the point."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gridfl import state
from gridfl.plan import Plan
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, WsWorker, join, report


def _run_worker(srv, kind, seed, **extra):
    w = HttpWorker(srv.url) if kind == "http" else WsWorker(srv.url, srv.ws_url)
    try:
        wid, cyc = join(w)
        assert cyc["status"] == "accepted", cyc
        key = cyc["request_key"]
        r = w.get("get-model", worker_id=wid, request_key=key, model_id=cyc["model_id"])
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        params = state.loads(r.content)
        for name, plan_id in cyc["plans"].items():
            r = w.get(
                "get-plan",
                worker_id=wid,
                request_key=key,
                plan_id=plan_id,
                receive_operations_as="onnx",
            )
            assert r.status_code == 200, r.text
            plan = Plan.from_bytes(r.content)
            assert plan.kind == "training", name
        st, body = report(w, wid, key, diff_of(seed), **extra(seed) if callable(extra) else {})
        assert (st, body) == (200, {"status": "success"})
        return params
    finally:
        w.close()


def test_whole_cycle_concurrent_workers(server):
    admin = Admin(server.url)
    n = 6
    r = admin.host(host_payload(server_config={"max_workers": n, "max_diffs": n, "num_cycles": 2}))
    assert r.status_code == 201, r.text
    start = model_params()
    with ThreadPoolExecutor(n) as ex:
        got = list(ex.map(lambda i: _run_worker(server, "http" if i % 2 else "ws", i), range(n)))
    for params in got:
        for a, b in zip(params, start, strict=True):
            np.testing.assert_array_equal(a, b)
    expected = [p - np.mean([diff_of(i)[j] for i in range(n)], axis=0) for j, p in enumerate(start)]
    new = admin.checkpoint("latest")
    for a, b in zip(new, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    st = admin.status()
    assert [c["status"] for c in st["cycles"]] == ["completed", "open"]
    assert st["cycles"][0]["reported"] == n
    assert [c["number"] for c in st["checkpoints"]] == [1, 2]
    assert st["checkpoints"][1]["alias"] == "latest"
    np.testing.assert_array_equal(admin.checkpoint("1")[0], start[0])


def test_weighted_mean_and_metrics(in_process_node):
    admin = Admin(in_process_node.url)
    assert admin.host(host_payload(server_config={"max_diffs": 3})).status_code == 201
    weights = [10, 30, 60]
    for i, n in enumerate(weights):
        w = HttpWorker(in_process_node.url)
        wid, cyc = join(w)
        st, body = report(
            w,
            wid,
            cyc["request_key"],
            diff_of(i),
            num_samples=n,
            metrics={"loss": float(i), "accuracy": 0.5},
        )
        assert st == 200, body
    start = model_params()
    for j, p in enumerate(start):
        mean = sum(n * diff_of(i)[j].astype(np.float64) for i, n in enumerate(weights)) / 100
        np.testing.assert_allclose(admin.checkpoint()[j], p - mean, rtol=1e-6, atol=1e-7)
    c = admin.status()["cycles"][0]
    assert c["num_samples"] == 100
    assert c["metrics"]["loss"] == pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)
    assert c["metrics"]["accuracy"] == pytest.approx(0.5)


def test_averaging_plan_iterative(in_process_node):
    admin = Admin(in_process_node.url)
    r = admin.host(
        host_payload(server_config={"max_diffs": 3, "iterative_plan": True}, avg_plan=True)
    )
    assert r.status_code == 201, r.text
    for i in range(3):
        w = HttpWorker(in_process_node.url)
        wid, cyc = join(w)
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    for j, p in enumerate(model_params()):
        mean = np.mean([diff_of(i)[j] for i in range(3)], axis=0)
        np.testing.assert_allclose(admin.checkpoint()[j], p - mean, rtol=1e-5, atol=1e-6)


def test_deadline_closes_cycle_without_more_reports(in_process_node):
    server = in_process_node
    admin = Admin(server.url)
    cfg = {"cycle_length": 1.0, "max_diffs": 5, "min_diffs": 1}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(server.url)
    wid, cyc = join(w)
    assert report(w, wid, cyc["request_key"], diff_of(0))[0] == 200
    assert admin.status()["cycles"][0]["status"] == "open"
    deadline = time.time() + 5
    while admin.status()["cycles"][0]["status"] == "open":
        assert time.time() < deadline, "the timer did not close the cycle"
        time.sleep(0.05)
    st = admin.status()
    assert st["cycles"][0]["status"] == "completed"
    # closed by the timer soon after the deadline (no report came); slack for a busy machine
    assert st["cycles"][0]["closed_at"] - st["cycles"][0]["end"] < 2.0
    for j, p in enumerate(model_params()):
        np.testing.assert_allclose(admin.checkpoint()[j], p - diff_of(0)[j], rtol=1e-6)


def test_deadline_without_enough_reports_expires_and_reopens(in_process_node):
    server = in_process_node
    admin = Admin(server.url)
    # long enough for the report to land in the first cycle on a busy machine
    cfg = {"cycle_length": 2.0, "max_diffs": 5, "min_diffs": 2}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(server.url)
    wid, cyc = join(w)
    assert report(w, wid, cyc["request_key"], diff_of(0))[0] == 200
    deadline = time.time() + 20
    while len(admin.status()["cycles"]) < 3:
        assert time.time() < deadline, "the timer did not expire the cycles"
        time.sleep(0.05)
    st = admin.status()
    assert [c["status"] for c in st["cycles"]][:2] == ["expired", "expired"]
    assert st["cycles"][-1]["status"] == "open"
    assert all(c["checkpoint"] == 1 for c in st["cycles"])
    assert [c["number"] for c in st["checkpoints"]] == [1]
    # the worker of the expired cycle reports late: refused
    st2, body = report(w, wid, cyc["request_key"], diff_of(0))
    assert st2 == 409 and "already reported" in body["error"]


def test_max_workers_over_selection_and_timeout(in_process_node):
    admin = Admin(in_process_node.url)
    cfg = {"max_workers": 2, "over_selection": 1.5, "max_diffs": 2, "cycle_length": 100}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(in_process_node.url)
    results = [join(w)[1] for _ in range(4)]
    assert [r["status"] for r in results] == ["accepted"] * 3 + ["rejected"]
    assert isinstance(results[3]["timeout"], int) and 90 <= results[3]["timeout"] <= 100
    assert results[3]["reason"] == "the cycle is full"


def _rejection_timeouts(node, cfg, count):
    admin = Admin(node.url)
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(node.url)
    assert join(w)[1]["status"] == "accepted"
    started = time.time()
    timeouts = []
    for _ in range(count):
        reply = join(w)[1]
        assert reply["status"] == "rejected" and reply["reason"] == "the cycle is full"
        timeouts.append(reply["timeout"])
    return np.array(timeouts), time.time() - started


def test_without_pace_steering_every_rejection_points_at_the_deadline(in_process_node):
    cfg = {"max_workers": 1, "max_diffs": 1, "cycle_length": 100}
    timeouts, took = _rejection_timeouts(in_process_node, cfg, 30)
    assert timeouts.max() <= 100 and timeouts.min() >= 100 - took - 1
    assert timeouts.max() - timeouts.min() <= took + 1  # a herd at the deadline


def test_pace_steering_spreads_rejections_past_the_deadline(in_process_node):
    window, count = 10.0, 30
    cfg = {"max_workers": 1, "max_diffs": 1, "cycle_length": 100,
           "pace_steering": {"window": window}}
    timeouts, took = _rejection_timeouts(in_process_node, cfg, count)
    # at most count + 1 check-ins (the accepted one too) in ``took`` seconds: the averaged
    # rate is at most (count + 1) / 60 per second, while one seat per 10 s window is needed
    most_oversupply = ((count + 1) / 60) / (1 / window)
    assert timeouts.min() >= 100 - took - 1
    assert timeouts.max() <= 100 + window * most_oversupply + 1
    assert len(set(timeouts.tolist())) >= count // 2  # spread, not one herd
    assert timeouts.max() > 100 + window  # the horizon grew with the check-ins


def test_reuse_rule(in_process_node):
    admin = Admin(in_process_node.url)
    cfg = {"max_diffs": 1, "do_not_reuse_workers_until_cycle": 3, "num_cycles": 0}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(in_process_node.url)
    _st, auth = w.call("model-centric/authenticate", {"model_name": "mnist"})
    wid = auth["worker_id"]

    def request():
        return w.call("model-centric/cycle-request", {"worker_id": wid, "model": "mnist"})[1]

    def fill_cycle():  # another worker completes the current cycle
        other = HttpWorker(in_process_node.url)
        owid, ocyc = join(other)
        assert report(other, owid, ocyc["request_key"], diff_of(1))[0] == 200

    cyc = request()
    assert cyc["status"] == "accepted"  # cycle 1
    assert report(w, wid, cyc["request_key"], diff_of(0))[0] == 200  # closes cycle 1
    again = request()  # cycle 2
    assert again["status"] == "rejected" and "from cycle 4" in again["reason"]
    assert "timeout" in again
    fill_cycle()  # cycle 2 done
    assert request()["status"] == "rejected"  # cycle 3
    fill_cycle()  # cycle 3 done
    assert request()["status"] == "accepted"  # cycle 4


def test_num_cycles_reached_rejects_without_timeout(in_process_node):
    admin = Admin(in_process_node.url)
    cfg = {"max_diffs": 1, "num_cycles": 1}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    w = HttpWorker(in_process_node.url)
    wid, cyc = join(w)
    assert report(w, wid, cyc["request_key"], diff_of(0))[0] == 200
    _, cyc = join(w)
    assert cyc["status"] == "rejected" and "timeout" not in cyc
    assert admin.status()["status"] == "finished"


def test_bad_reports_leave_aggregate_unchanged(in_process_node):
    admin = Admin(in_process_node.url)
    assert admin.host(host_payload(server_config={"max_diffs": 2})).status_code == 201
    a, b = HttpWorker(in_process_node.url), HttpWorker(in_process_node.url)
    wa, ca = join(a)
    wb, cb = join(b)
    ka, kb = ca["request_key"], cb["request_key"]
    bad_shape = [np.zeros((3, 4), np.float32), np.zeros(3, np.float32)]
    nan = diff_of(0)
    nan[1][0] = np.nan
    cases = [
        (report(a, wa, kb, diff_of(0)), 401, "Invalid request key"),  # someone else's key
        (report(a, wa, ka, bad_shape), 400, "tensor 0"),
        (report(a, wa, ka, [diff_of(0)[0]]), 400, "1 tensors"),
        (report(a, wa, ka, [d.astype(np.float64) for d in diff_of(0)]), 400, "float64"),
        (report(a, wa, ka, nan), 400, "NaN"),
        (report(a, wa, ka, b"not a state"), 400, "State"),
        (report(a, wa, ka, "%%%"), 400, "base64"),
        (report(a, "nobody", ka, diff_of(0)), 400, "Worker ID not found"),
    ]
    for (st, body), want_st, text in cases:
        assert st == want_st and text in body["error"], (st, body)
    assert report(a, wa, ka, diff_of(0))[0] == 200
    st, body = report(a, wa, ka, diff_of(0))  # double report
    assert st == 409 and "already reported" in body["error"]
    assert admin.status()["cycles"][0]["reported"] == 1
    assert report(b, wb, kb, diff_of(1))[0] == 200
    for j, p in enumerate(model_params()):
        mean = (diff_of(0)[j] + diff_of(1)[j]) / 2
        np.testing.assert_allclose(admin.checkpoint()[j], p - mean, rtol=1e-6, atol=1e-7)
