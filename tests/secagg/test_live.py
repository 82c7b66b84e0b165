"""Secure aggregation on a real node (uvicorn on loopback, SQLite): six workers, two of
which drop out after advertising their keys. The checkpoint must equal the current model
minus the num_samples-weighted mean of the four survivors' quantized diffs, computed here
with numpy; no diff is ever sent to the node in the clear."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from gridfl import AggregationAbortedError, Syft, _messages, state
from gridfl._exceptions import ProtocolError
from gridfl.secagg import NAME, SecAggParams, WorkerSession
from gridfl.secagg import messages as m
from tests.harness import HttpWorker

pytest.importorskip("starlette")

STEP = 1024  # quantization steps per unit: diffs k / STEP are exact (scale == STEP)
SECAGG = {"threshold": 4, "clipping_range": 32767 / STEP, "stage_timeout": 2.0}


def _join(worker, name) -> tuple[str, dict]:
    st, auth = worker.call(_messages.AUTHENTICATE, {"model_name": name, "model_version": "1.0"})
    assert st == 200, auth
    req = {"worker_id": auth["worker_id"], "model": name, "protocols": ["secure_aggregation"]}
    st, cyc = worker.call(_messages.CYCLE_REQUEST, req)
    assert st == 200 and cyc["status"] == "accepted", cyc
    return auth["worker_id"], cyc


def _stage(worker, wid, key, stage, message=None) -> dict:
    """Send one stage message (or poll with None until the node has this stage's)."""
    body = {"worker_id": wid, "request_key": key, "stage": stage, "message": message}
    while True:
        st, reply = worker.call(_messages.SECURE_AGGREGATION, body)
        assert st == 200, reply
        if message is not None or reply["status"] != "waiting":
            return reply
        time.sleep(reply["retry_after"])


def _dropping_worker(url, name, params, drop_after, out, i):
    """A worker driven by hand that goes silent after stage ``drop_after``."""
    worker = HttpWorker(url)
    try:
        wid, cyc = _join(worker, name)
        key = cyc["request_key"]
        sa = WorkerSession(params, wid)
        reply = _stage(worker, wid, key, m.ADVERTISE, sa.advertise().to_json())
        if drop_after == m.SHARE:
            reply = _stage(worker, wid, key, m.SHARE)
            sa.bind(reply["session"].encode())
            roster = m.Roster.from_json(reply["message"])
            _stage(worker, wid, key, m.SHARE, sa.share_keys(roster).to_json())
        out[i] = "dropped"
    except BaseException as e:  # noqa: BLE001 - reported by the test
        out[i] = e
    finally:
        worker.close()


def _sdk_worker(url, name, diff, num_samples, out, i):
    """The worker SDK as users write it: start, then report; the protocol runs inside."""
    try:
        with Syft(url) as grid:
            job = grid.new_job(name, "1.0")
            job.start()
            assert json.loads(job.protocols["secure_aggregation"])["name"] == NAME
            out[i] = job.report(state.dumps(diff), num_samples=num_samples)
    except BaseException as e:  # noqa: BLE001 - reported by the test
        out[i] = e


@pytest.mark.parametrize("drop_after", [m.ADVERTISE, m.SHARE])
@pytest.mark.parametrize("transport", ["http", "ws"])
def test_six_workers_two_drop_out(server, transport, drop_after):
    name = server.host(
        server_config={"max_workers": 6, "max_diffs": 6, "secure_aggregation": SECAGG}
    )
    params = SecAggParams(**server.status(name)["server_config"]["secure_aggregation"])
    assert params.scale == STEP
    current = server.checkpoint(name)
    rng = np.random.default_rng(11)
    ks = [[rng.integers(-500, 501, p.shape) for p in current] for _ in range(6)]
    diffs = [[(k / STEP).astype(np.float32) for k in kk] for kk in ks]
    samples = [int(rng.integers(1, 100)) for _ in range(6)]
    dropping = {1, 4}
    out: list = [None] * 6
    threads = [
        threading.Thread(
            target=_dropping_worker,
            args=(server.url, name, params, drop_after, out, i),
        )
        if i in dropping
        else threading.Thread(
            target=_sdk_worker,
            args=(server.url_for(transport), name, diffs[i], samples[i], out, i),
        )
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [o for o in out if isinstance(o, BaseException)]
    assert not errors, errors
    status = server.status(name)
    assert status["cycles"][0]["status"] == "completed", status
    # numpy reference: the weighted mean of the survivors' quantized diffs
    survivors = [i for i in range(6) if i not in dropping]
    w = np.array([samples[i] for i in survivors], np.float64)
    new = server.checkpoint(name)
    for t, cur in enumerate(current):
        k = np.stack([ks[i][t] for i in survivors]).astype(np.float64)
        mean = (w.reshape(-1, *[1] * cur.ndim) * k).sum(0) / (w.sum() * STEP)
        expected = (cur.astype(np.float64) - mean).astype(cur.dtype)
        np.testing.assert_array_equal(new[t], expected)
    assert not np.array_equal(new[0], current[0])


def test_over_the_socket_masked_inputs_go_as_binary_frames(server, monkeypatch):
    """The SDK on a socket that negotiated gridfl.binary.2 sends each masked input as a
    binary frame (header, then the packed vector) and the node sums them as it does
    base64 ones: the checkpoint is the weighted mean (numpy reference)."""
    sent: list[str] = []
    encode = _messages.encode_binary_report

    def spy(data, request_id=None, kind=_messages.REPORT):
        sent.append(kind)
        return encode(data, request_id, kind)

    monkeypatch.setattr(_messages, "encode_binary_report", spy)
    name = server.host(server_config={"max_workers": 3, "max_diffs": 3,
                                      "secure_aggregation": {**SECAGG, "threshold": 2}})
    current = server.checkpoint(name)
    rng = np.random.default_rng(5)
    ks = [[rng.integers(-500, 501, p.shape) for p in current] for _ in range(3)]
    samples = [3, 5, 7]
    out: list = [None] * 3
    threads = [
        threading.Thread(target=_sdk_worker, args=(
            server.url_for("ws"), name, [(k / STEP).astype(np.float32) for k in ks[i]],
            samples[i], out, i))
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [o for o in out if isinstance(o, BaseException)], out
    assert sent.count(_messages.SECURE_AGGREGATION) == 3, sent
    w = np.array(samples, np.float64)
    for t, (cur, new) in enumerate(zip(current, server.checkpoint(name), strict=True)):
        k = np.stack([ks[i][t] for i in range(3)]).astype(np.float64)
        mean = (w.reshape(-1, *[1] * cur.ndim) * k).sum(0) / (w.sum() * STEP)
        np.testing.assert_array_equal(new, (cur.astype(np.float64) - mean).astype(cur.dtype))


def test_the_sdk_name_is_the_protocol_name():
    from gridfl.client._flow import SECURE_AGGREGATION

    assert SECURE_AGGREGATION == NAME


def test_the_sdk_raises_when_too_few_survive(server):
    """min_survivors 3 of 3 and one worker silent after advertising: job.report raises
    AggregationAbortedError with the node's reason, and the cycle expires."""
    cfg = {**SECAGG, "threshold": 2, "min_survivors": 3, "stage_timeout": 1.0}
    name = server.host(server_config={"max_workers": 3, "max_diffs": 3, "secure_aggregation": cfg})
    params = SecAggParams(**server.status(name)["server_config"]["secure_aggregation"])
    diff = [np.zeros(p.shape, np.float32) for p in server.checkpoint(name)]
    out: list = [None] * 3
    threads = [
        threading.Thread(
            target=_dropping_worker, args=(server.url, name, params, m.ADVERTISE, out, 0)
        )
    ] + [
        threading.Thread(target=_sdk_worker, args=(server.url, name, diff, 5, out, i))
        for i in (1, 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out[0] == "dropped"
    for o in out[1:]:
        assert isinstance(o, AggregationAbortedError) and "it needs 3" in str(o), out
    assert server.status(name)["cycles"][0]["status"] == "expired"


def test_a_diff_with_nan_is_refused_by_its_worker_and_the_cycle_goes_on(server):
    """An honest worker does not mask a diverged diff (the node could not refuse it): its
    job.report raises before any stage, and the others' cycle completes without it."""
    name = server.host(server_config={"max_workers": 3, "max_diffs": 2,
                                      "secure_aggregation": {**SECAGG, "threshold": 2}})
    current = server.checkpoint(name)
    broken = [np.zeros(p.shape, np.float32) for p in current]
    broken[-1].flat[0] = np.nan
    out: list = [None] * 3
    _sdk_worker(server.url, name, broken, 4, out, 0)  # first: it would close the stage
    assert isinstance(out[0], ProtocolError) and "has NaN or infinite values" in str(out[0])
    ks = [[np.full(p.shape, 10 * (i + 1)) for p in current] for i in range(2)]
    threads = [
        threading.Thread(target=_sdk_worker, args=(
            server.url, name, [(k / STEP).astype(np.float32) for k in ks[i]], 3, out, i + 1))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [o for o in out[1:] if isinstance(o, BaseException)], out
    assert server.status(name)["cycles"][0]["status"] == "completed"
    for cur, new in zip(current, server.checkpoint(name), strict=True):
        # the mean of the two others' diffs (10 and 20 steps): 15 steps
        np.testing.assert_array_equal(new, (cur.astype(np.float64) - 15 / STEP).astype(cur.dtype))
