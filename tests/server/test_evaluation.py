"""Federated evaluation on a live node (server_config.evaluation): real gridfl workers
over WebSocket and HTTP evaluate each due checkpoint on their own held-out data; the
node's aggregate must equal the num_samples-weighted mean of each worker's metrics,
computed here with numpy from the checkpoint the node serves."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl.client import run_worker
from tests.builders import linear_data, linear_eval_plan, linear_sgd_plan
from tests.harness import HttpWorker, LiveNode, in_threads, join, make_settings

WORKERS = 3
HELD_OUT = (11, 29, 60)  # different sizes: an unweighted mean would differ


def _host(node: LiveNode, workers: int = WORKERS, **evaluation) -> str:
    return node.host(
        plans={"training_plan": linear_sgd_plan(), "evaluation_plan": linear_eval_plan()},
        server_config={
            "num_cycles": 2,
            "max_workers": workers,
            "max_diffs": workers,
            "evaluation": {"every": 1, "max_workers": WORKERS, **evaluation},
        },
    )


def _reference(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The evaluation plan's formula in float64: mean squared error and mean |error|."""
    err = x.astype(np.float64) @ params[0].astype(np.float64) + params[1] - y
    return {"loss": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err)))}


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_evaluation_metrics_are_the_weighted_mean_of_the_workers(
    server_factory, tmp_path, db_url, transport
):
    node = server_factory(db_url)
    name = _host(node)
    held_out = [linear_data(n, seed=100 + i) for i, n in enumerate(HELD_OUT)]

    def work(i: int):
        x, y = linear_data(64, seed=i)
        return run_worker(
            node.url_for(transport), name, x, y, model_version="1.0",
            eval_data=held_out[i], long_poll=10, max_wait=0.5, allow_insecure=True,
        )

    summaries = in_threads(work, [(i,) for i in range(WORKERS)])
    assert all(s.cycles == 2 for s in summaries), summaries

    evaluations = node.host_client.evaluations(name, "1.0")
    # checkpoints 2 and 3 come out of cycles 1 and 2; every=1 evaluates both
    assert [e["checkpoint"] for e in evaluations] == [2, 3]
    for e in evaluations:
        params = node.checkpoint(name, e["checkpoint"])
        own = [_reference(params, x, y) for x, y in held_out]
        weights = np.array(HELD_OUT, dtype=np.float64)
        assert e["accepted"] == e["reported"] == WORKERS
        assert e["num_samples"] == sum(HELD_OUT)
        for metric in ("loss", "mae"):
            expected = float(np.dot(weights, [m[metric] for m in own]) / weights.sum())
            assert e["metrics"][metric] == pytest.approx(expected, rel=1e-5)
    # each worker's own reports are its metrics on its own data
    for i, s in enumerate(summaries):
        assert s.evaluations == 2
        for e, mine in zip(evaluations, s.evaluation_metrics, strict=True):
            ref = _reference(node.checkpoint(name, e["checkpoint"]), *held_out[i])
            assert mine == pytest.approx(ref, rel=1e-5)

    # the stored metrics survive a restart of the node on the same database
    node.stop()
    again = LiveNode(make_settings(db_url, tmp_path))
    try:
        assert again.host_client.evaluations(name, "1.0") == evaluations
    finally:
        again.stop()


def test_evaluation_seats_and_reports_are_checked(server):
    name = _host(server, max_workers=1)
    w = HttpWorker(server.url)
    try:
        # a worker that names no capability (as syft.js) is never placed in an evaluation
        wid, cycle = join(w, name)
        assert cycle["status"] == "accepted" and "kind" not in cycle
        status, body = w.call("model-centric/evaluation-report", {
            "worker_id": wid, "request_key": cycle["request_key"], "num_samples": 3,
            "metrics": {"loss": 1.0}})
        assert status == 401 and "evaluation cycle" in body["error"]
        # missing num_samples, no metrics: 400 with what is wrong
        for bad, word in (({"metrics": {"loss": 1.0}}, "num_samples"),
                          ({"num_samples": 3, "metrics": {}}, "metrics")):
            status, body = w.call("model-centric/evaluation-report",
                                  {"worker_id": wid, "request_key": "k", **bad})
            assert status == 400 and word in body["error"]
    finally:
        w.close()
    assert server.status(name).get("evaluations") == []


def test_evaluation_reports_once_per_seat(server):
    from gridfl import Syft

    name = _host(server, workers=1, max_workers=1)
    x, y = linear_data(64, seed=0)
    run_worker(server.url, name, x, y, model_version="1.0", max_cycles=1,
               allow_insecure=True)  # checkpoint 2 exists now: it is due
    with Syft(server.url, allow_insecure=True) as client:
        job = client.new_job(name, "1.0")
        job.can_evaluate = True
        job.start()
        assert job.kind == "evaluation"
        assert list(job.plans) == ["evaluation_plan"]  # the training plan is not listed
        result = job.evaluate(x[:10], y[:10])
        job.report_metrics(result.num_samples, result.metrics)
        # a second worker finds the evaluation's one seat taken: it trains
        other = client.new_job(name, "1.0")
        other.can_evaluate = True
        other.start()
        assert other.kind == "training"
    w = HttpWorker(server.url)
    try:
        status, body = w.call("model-centric/evaluation-report", {
            "worker_id": job.worker_id, "request_key": job.request_key, "num_samples": 10,
            "metrics": result.metrics})
        assert status == 409 and "already reported" in body["error"]
    finally:
        w.close()
    (e,) = server.host_client.evaluations(name, "1.0")
    assert (e["checkpoint"], e["accepted"], e["reported"], e["num_samples"]) == (2, 1, 1, 10)



def test_a_seat_not_reported_in_time_goes_to_the_next_worker(server_factory, db_url):
    """evaluation.seat_timeout: a seat whose worker never reports stops counting towards
    max_workers once it lapses, the next evaluation-capable worker takes it, and the
    late report is refused with a 409 that says why (SQLite and PostgreSQL)."""
    import time

    from gridfl import Syft

    node = server_factory(db_url)
    name = _host(node, workers=1, max_workers=1, seat_timeout=1.0)
    x, y = linear_data(64, seed=0)
    run_worker(node.url, name, x, y, model_version="1.0", max_cycles=1,
               allow_insecure=True)  # checkpoint 2 is due
    clients = [Syft(node.url, allow_insecure=True) for _ in range(3)]  # 3 workers
    try:
        silent, early, late = (c.new_job(name, "1.0") for c in clients)
        for job in (silent, early, late):
            job.can_evaluate = True
        silent.start()
        accepted_at = time.monotonic()
        assert silent.kind == "evaluation"
        # within the timeout the one seat is held: the next capable worker trains
        early.start()
        assert time.monotonic() - accepted_at < 1.0, "the check ran past the timeout"
        assert early.kind == "training"
        time.sleep(1.2)  # past seat_timeout: the silent worker's seat lapses
        late.start()
        assert late.kind == "evaluation"
        result = late.evaluate(x[:7], y[:7])
        late.report_metrics(result.num_samples, result.metrics)
    finally:
        for c in clients:
            c.close()
    w = HttpWorker(node.url)
    try:
        status, body = w.call("model-centric/evaluation-report", {
            "worker_id": silent.worker_id, "request_key": silent.request_key,
            "num_samples": 10, "metrics": {"loss": 1.0, "mae": 1.0}})
        assert status == 409, body
        assert "seat lapsed" in body["error"] and "seat_timeout" in body["error"]
    finally:
        w.close()
    (e,) = node.host_client.evaluations(name, "1.0")
    # both seats were handed out; only the one that reported in time counts
    assert (e["checkpoint"], e["accepted"], e["reported"], e["num_samples"]) == (2, 2, 1, 7)
    assert e["metrics"] == pytest.approx(_reference(node.checkpoint(name, 2), x[:7], y[:7]),
                                         rel=1e-5)


_SECAGG = {"threshold": 3, "min_survivors": 3}


@pytest.mark.parametrize(
    ("server_config", "with_evaluation_plan", "message"),
    [
        ({"evaluation": {"every": 0}}, True,
         "server_config.evaluation.every must be an integer >= 1"),
        ({"evaluation": {"every": -3}}, True,
         "server_config.evaluation.every must be an integer >= 1"),
        ({"evaluation": {"every": 1.5}}, True,
         "server_config.evaluation.every must be an integer >= 1"),
        ({"evaluation": {"max_workers": 0}}, True,
         "server_config.evaluation.max_workers must be an integer >= 1"),
        ({"evaluation": {"max_workers": "3"}}, True,
         "server_config.evaluation.max_workers must be an integer >= 1"),
        ({"evaluation": {"every": 1, "rounds": 2}}, True,
         'server_config.evaluation must be null or {"every": n, "max_workers": m'),
        ({"evaluation": 5}, True,
         'server_config.evaluation must be null or {"every": n, "max_workers": m'),
        ({"evaluation": {"every": 2}}, False,
         "server_config.evaluation needs an evaluation plan"),
        ({"evaluation": {"every": 1}, "mode": "async", "cycle_length": None,
          "max_diffs": None}, True,
         "has no cycle to evaluate after"),
        ({"evaluation": {"every": 1}, "max_workers": 4,
          "secure_aggregation": _SECAGG}, True,
         "server_config.evaluation is not combined with secure_aggregation"),
        ({"evaluation": {"every": 1}, "max_workers": 2, "max_diffs": 2,
          "differential_privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0,
                                   "population_size": 100}}, True,
         "server_config.evaluation is not combined with differential_privacy"),
        ({"evaluation": {"seat_timeout": 0.5}}, True,
         "server_config.evaluation.seat_timeout must be"),
        ({"evaluation": {"seat_timeout": "10"}}, True,
         "server_config.evaluation.seat_timeout must be"),
    ],
)
def test_bad_evaluation_config_is_refused_and_stores_nothing(
    server, server_config, with_evaluation_plan, message
):
    from tests.builders import b64, host_payload, linear_params
    from tests.harness import Admin

    plans = {"training_plan": b64(linear_sgd_plan())}
    if with_evaluation_plan:
        plans["evaluation_plan"] = b64(linear_eval_plan())
    payload = host_payload("bad", server_config={"num_cycles": 0, **server_config},
                           params=linear_params(), plans=plans)
    admin = Admin(server.url)
    r = admin.host(payload)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert admin.http.get("/gridfl/v1/processes/bad/1.0").status_code == 404
    assert "bad" not in [p["name"] for p in server.host_client.processes()]


def test_plan_kind_reads_the_onnx_metadata_alone():
    from gridfl.server.evaluation import plan_kind

    assert plan_kind(linear_eval_plan()) == "evaluation"
    assert plan_kind(linear_sgd_plan()) == "training"
    assert plan_kind(b"\x0f\xff not onnx") is None and plan_kind(b"") is None
