"""The database briefly unavailable: a private PostgreSQL cluster is stopped under a running
``gridfl serve`` process and started again. While it is down every worker call fails with a
clear, retryable 503 (``UnavailableError`` in the SDK: "the database is unavailable ...
retry later"), nothing half-done is left, and once it is back the node serves again by
itself (no restart): the cycle completes with every report counted once."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gridfl._exceptions import UnavailableError
from tests._faultkit import assert_mean_applied, wait_until
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, WsWorker, join, report

pytestmark = pytest.mark.postgres


def _unavailable(code: int, body: dict) -> None:
    assert code == 503, (code, body)
    text = body.get("error", "")
    assert "database is unavailable" in text and "retry" in text, body


def test_postgres_stopped_and_started(serve_factory, pg_cluster, tmp_path):
    srv = serve_factory(pg_cluster.url)
    admin = Admin(srv.url)
    sc = {"max_diffs": 4, "num_cycles": 1, "cycle_length": 600}
    assert admin.host(host_payload(server_config=sc)).status_code == 201
    http = HttpWorker(srv.url)
    wid0, c0 = join(http)
    wid1, c1 = join(http)
    assert report(http, wid0, c0["request_key"], diff_of(0))[0] == 200

    pg_cluster.stop()
    # HTTP: every worker call is a clear, retryable 503
    _unavailable(*http.call("model-centric/authenticate", {"model_name": "mnist"}))
    code, body = http.call("model-centric/cycle-request", {"worker_id": wid1, "model": "mnist"})
    _unavailable(code, body)
    assert body["status"] == "rejected"
    _unavailable(*report(http, wid1, c1["request_key"], diff_of(1)))
    key, model_id = c1["request_key"], c1["model_id"]
    r = http.get("get-model", worker_id=wid1, request_key=key, model_id=model_id)
    _unavailable(r.status_code, r.json())
    # WebSocket: the same error in data.error, with the status code
    ws = WsWorker(srv.url, srv.ws_url)
    _, body = ws.call("model-centric/authenticate", {"model_name": "mnist"})
    assert "database is unavailable" in body["error"] and body.get("status_code") == 503, body
    # the worker SDK raises UnavailableError (retryable) after its bounded retries
    from gridfl import Syft

    client = Syft(srv.ws_url, timeout=10, retries=1)
    job = client.new_job("mnist", "1.0")
    errors = []
    job.on("error", errors.append)  # with an error handler the job reports, not raises
    try:
        job.start()
    finally:
        client.close()
    assert len(errors) == 1 and isinstance(errors[0], UnavailableError), errors
    assert errors[0].retryable and "database is unavailable" in str(errors[0])
    assert srv.proc.poll() is None  # the node itself is alive

    # a worker loop started during the outage keeps retrying and gets through
    from gridfl.client import run_worker

    result = {}

    def loop():
        rng = np.random.default_rng(0)
        X = rng.standard_normal((8, 4)).astype(np.float32)
        y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
        result["summary"] = run_worker(
            srv.url, "mnist", X, y, model_version="1.0", max_cycles=1, min_wait=0.5,
            max_errors=20, retries=0,
            on_trained=lambda job, res: result.setdefault("params", res.params),
        )

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    time.sleep(1.5)
    pg_cluster.start()

    # recovered by itself: the same (stale) pool serves again
    wait_until(
        lambda: http.call("model-centric/authenticate", {"model_name": "mnist"})[0] == 200,
        20, "the node to serve again",
    )
    t.join(timeout=60)
    assert result["summary"].cycles == 1 and result["summary"].errors >= 1
    # the report refused during the outage was not stored: the same key works now
    assert report(http, wid1, c1["request_key"], diff_of(1))[0] == 200
    wid3, c3 = join(ws)
    assert report(ws, wid3, c3["request_key"], diff_of(3))[0] == 200
    st = admin.status()
    assert (st["cycles"][0]["status"], st["cycles"][0]["reported"]) == ("completed", 4)
    sdk_diff = [p - q for p, q in zip(model_params(), result["params"], strict=True)]
    assert_mean_applied(
        admin.checkpoint(2), model_params(), [diff_of(0), diff_of(1), sdk_diff, diff_of(3)]
    )
    ws.close()
    assert "internal server error" not in srv.log.read_text().lower()
