"""Binary report frames over the WebSocket (gridfl extension, docs/protocol.md): the
subprotocol handshake, reports that aggregate exactly like JSON ones (also mixed in one
cycle), error replies that keep the envelope and the socket. The malformed frames are in
the bad-input matrix (test_bad_input.py, ``ws-binary-*`` and every report case as
``[wsbin]``)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from websockets.sync.client import connect

from gridfl import state
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, WsBinWorker, WsWorker, join, report

REPORT = "model-centric/report"
SUBPROTOCOL = "gridfl.binary.2"


def _host(server, **cfg) -> Admin:
    admin = Admin(server.url)
    r = admin.host(host_payload(server_config=cfg))
    assert r.status_code == 201, r.text
    return admin


@pytest.mark.parametrize(
    ("offered", "selected"),
    [
        ([SUBPROTOCOL], SUBPROTOCOL),
        (["chat", SUBPROTOCOL], SUBPROTOCOL),
        (["gridfl.binary-report.1"], None),  # never released, no longer selected: JSON
        (["chat"], None),
        (None, None),  # syft.js offers none: the handshake is as before
    ],
)
def test_subprotocol_handshake(server, offered, selected):
    with connect(server.ws_url, subprotocols=offered, open_timeout=20) as ws:
        assert ws.subprotocol == selected
        ws.send(json.dumps({"type": "socket-ping", "request_id": "p"}))
        assert json.loads(ws.recv(timeout=30)) == {"alive": "True", "request_id": "p"}


def test_binary_and_json_reports_aggregate_alike(server):
    """One cycle, three reports: binary (weighted, with metrics), JSON text over WS, HTTP."""
    admin = _host(server, max_diffs=3)
    workers = [WsBinWorker(server.url, server.ws_url), WsWorker(server.url, server.ws_url),
               HttpWorker(server.url)]
    weights = [60, 30, 10]
    try:
        for i, (w, n) in enumerate(zip(workers, weights, strict=True)):
            wid, cyc = join(w)
            got = report(w, wid, cyc["request_key"], diff_of(i), num_samples=n,
                         metrics={"loss": float(i)})
            assert got == (200, {"status": "success"}), (w.transport, got)
    finally:
        for w in workers:
            w.close()
    for j, p in enumerate(model_params()):
        mean = sum(n * diff_of(i)[j].astype(np.float64) for i, n in enumerate(weights)) / 100
        np.testing.assert_allclose(admin.checkpoint()[j], p - mean, rtol=1e-6, atol=1e-7)
    cycle = admin.status()["cycles"][0]
    assert (cycle["reported"], cycle["num_samples"]) == (3, 100)
    assert cycle["metrics"]["loss"] == pytest.approx((0 * 60 + 1 * 30 + 2 * 10) / 100)


def test_binary_report_errors_keep_envelope_and_socket(server):
    """A refused binary report answers in the JSON envelope with its request_id and the
    HTTP status; the socket stays open and a good report on it then succeeds."""
    admin = _host(server, max_diffs=1)
    w = WsBinWorker(server.url, server.ws_url)
    try:
        wid, cyc = join(w)
        key = cyc["request_key"]
        assert report(w, wid, "0" * 64, diff_of(0)) == (401, {
            "error": "Invalid request key!", "status_code": 401})
        bad = state.dumps(diff_of(0)[:1])
        st, body = report(w, wid, key, bad)
        assert (st, body["error"]) == (
            400, "diff is not valid State bytes: State has 1 tensors; expected 2")
        assert admin.status()["cycles"][0]["reported"] == 0
        assert report(w, wid, key, diff_of(0)) == (200, {"status": "success"})
        st, body = report(w, wid, key, diff_of(0))  # the cycle closed with that report
        assert st == 409, body
    finally:
        w.close()
    for j, p in enumerate(model_params()):
        np.testing.assert_allclose(admin.checkpoint()[j], p - diff_of(0)[j], rtol=1e-6)


def test_concurrent_binary_reports_complete_exactly_once(server):
    admin = _host(server, max_diffs=3, num_cycles=0)
    workers = [WsBinWorker(server.url, server.ws_url) for _ in range(8)]
    try:
        joined = [join(w) for w in workers]
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(
                lambda i: report(workers[i], joined[i][0], joined[i][1]["request_key"],
                                 diff_of(i)),
                range(8),
            ))
    finally:
        for w in workers:
            w.close()
    ok = [r for r in results if r[0] == 200]
    late = [r for r in results if r[0] == 409 and "too late" in r[1]["error"]]
    assert len(ok) == 3 and len(late) == 5, results
    st = admin.status()
    assert [c["number"] for c in st["checkpoints"]] == [1, 2]
    assert st["cycles"][0]["reported"] == 3


def test_binary_frame_over_the_body_limit_closes_1009(server_factory):
    from websockets.exceptions import ConnectionClosed

    srv = server_factory(max_body_bytes=64 * 1024)
    head = json.dumps({"type": REPORT, "data": {"worker_id": "w", "request_key": "k"}}).encode()
    frame = len(head).to_bytes(4, "big") + head + b"\0" * (64 * 1024)
    with connect(srv.ws_url, subprotocols=[SUBPROTOCOL], open_timeout=20) as ws:
        ws.send(frame)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
