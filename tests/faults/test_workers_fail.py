"""Worker faults against a real ``gridfl serve`` process: workers that vanish after being
accepted, a connection that drops mid-upload (raw socket), and the worker SDK's
``run_worker`` behind a proxy that cuts its first report upload in half."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import numpy as np
import pytest

from gridfl import state
from tests._faultkit import assert_mean_applied, wait_until
from tests.builders import b64, diff_of, host_payload, model_params, training_plan
from tests.harness import Admin, HttpWorker, join, report


@pytest.fixture
def sqlite_db(tmp_path):
    return f"sqlite:///{tmp_path / 'grid.db'}"


def test_vanished_workers_cycle_closes_at_deadline_with_what_it_has(serve_factory, sqlite_db):
    """5 accepted, 3 report, 2 vanish: at the deadline the cycle completes with the 3
    reports (checkpoint = current - their mean); a vanished worker coming back late is
    refused (409) and changes nothing."""
    srv = serve_factory(sqlite_db)
    admin = Admin(srv.url)
    sc = {"max_diffs": None, "cycle_length": 2, "num_cycles": 2}
    assert admin.host(host_payload(server_config=sc)).status_code == 201
    w = HttpWorker(srv.url)
    joined = [join(w) for _ in range(5)]
    for i in range(3):
        wid, cyc = joined[i]
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    assert admin.status()["cycles"][0]["status"] == "open"  # waits for the deadline
    wait_until(lambda: admin.status()["cycles"][0]["status"] == "completed", 10, "deadline")
    st = admin.status()["cycles"][0]
    assert (st["accepted"], st["reported"]) == (5, 3)
    assert_mean_applied(admin.checkpoint(2), model_params(), [diff_of(i) for i in range(3)])
    wid, cyc = joined[3]
    code, body = report(w, wid, cyc["request_key"], diff_of(3))
    assert code == 409 and "too late" in body["error"], body
    assert_mean_applied(admin.checkpoint(2), model_params(), [diff_of(i) for i in range(3)])
    assert [c["number"] for c in admin.status()["checkpoints"]] == [1, 2]


def test_vanished_workers_below_min_diffs_cycle_expires(serve_factory, sqlite_db):
    """min_diffs=4 but only 3 of 5 accepted workers report: the cycle expires at its
    deadline, its reports are dropped, no checkpoint is made, and the next cycle trains
    the same checkpoint."""
    srv = serve_factory(sqlite_db)
    admin = Admin(srv.url)
    sc = {"max_diffs": None, "min_diffs": 4, "cycle_length": 2, "num_cycles": 2}
    assert admin.host(host_payload(server_config=sc)).status_code == 201
    w = HttpWorker(srv.url)
    joined = [join(w) for _ in range(5)]
    for i in range(3):
        wid, cyc = joined[i]
        assert report(w, wid, cyc["request_key"], diff_of(i))[0] == 200
    wait_until(lambda: admin.status()["cycles"][0]["status"] == "expired", 10, "expiry")
    st = admin.status()
    assert [(c["sequence"], c["status"]) for c in st["cycles"]] == [(1, "expired"), (2, "open")]
    assert [c["number"] for c in st["checkpoints"]] == [1]
    assert st["cycles"][1]["checkpoint"] == 1
    for a, b in zip(admin.checkpoint(), model_params(), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- mid-upload drop
BIG = [(256, 256), (256,)]  # ~350 KB of base64: the node is surely reading when we stop


def _big_params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in BIG]


def _big_payload(**sc):
    return host_payload(
        server_config={"max_diffs": 1, "num_cycles": 1, **sc},
        params=_big_params(),
        plans={"training_plan": b64(training_plan(BIG))},
    )


@pytest.mark.parametrize("how", ["close", "reset"])
def test_connection_dropped_mid_upload_stores_nothing(serve_factory, sqlite_db, how):
    """A raw socket sends the head and half of a report body, then closes (FIN) or resets
    (RST). Nothing is stored: the cycle has no report, the worker is not marked reported,
    and the same worker then reports with the same key and completes the cycle."""
    srv = serve_factory(sqlite_db)
    admin = Admin(srv.url)
    assert admin.host(_big_payload()).status_code == 201
    w = HttpWorker(srv.url)
    wid, cyc = join(w)
    diff = [0.01 * p for p in _big_params(1)]
    body = json.dumps(
        {"worker_id": wid, "request_key": cyc["request_key"], "diff": b64(state.dumps(diff))}
    ).encode()
    head = (
        "POST /model-centric/report HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(head + body[: len(body) // 2])
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    # the node is alive and stored nothing
    st = admin.status()["cycles"][0]
    assert (st["status"], st["accepted"], st["reported"]) == ("open", 1, 0)
    code, reply = report(w, wid, cyc["request_key"], diff)
    assert code == 200, reply
    assert_mean_applied(admin.checkpoint(2), _big_params(), [diff])
    assert "internal" not in srv.log.read_text().lower()


class CuttingProxy:
    """A TCP proxy to the node that cuts the FIRST report upload: it forwards the request
    head and half of the body, then closes both connections. Everything else passes."""

    MARK = b"POST /model-centric/report"

    def __init__(self, port: int) -> None:
        self.target = port
        self.cuts = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _up(self, client, upstream) -> None:
        buf = b""
        try:
            while data := client.recv(1 << 16):
                if self.cuts or (self.MARK not in buf + data):
                    upstream.sendall(data)
                    continue
                buf += data
                i = buf.index(self.MARK)
                end = buf.find(b"\r\n\r\n", i)
                if end < 0:
                    continue
                headers = buf[i:end].decode("latin-1").lower().split("\r\n")
                length = next(int(h.split(":")[1]) for h in headers if h.startswith("content-"
                                                                                  "length:"))
                if len(buf) - (end + 4) < length // 2:
                    continue
                upstream.sendall(buf[: end + 4 + length // 2])
                self.cuts += 1
                break
        except OSError:
            pass
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_sdk_run_worker_after_its_upload_is_cut(serve_factory, sqlite_db):
    """The worker SDK does not resend a report whose upload broke (it cannot know whether
    the node stored it): ``run_worker`` counts the round as an error and asks for a cycle
    again with the same worker id. The node refuses a second place in the same cycle
    ("already accepted"), so the worker long-polls, the cycle with no report expires at its
    deadline and the worker trains and reports in the next one. The node stored nothing
    from the cut upload: exactly one report, applied once."""
    from gridfl.client import run_worker

    srv = serve_factory(sqlite_db)
    admin = Admin(srv.url)
    assert admin.host(_big_payload(cycle_length=3)).status_code == 201
    proxy = CuttingProxy(srv.port)
    trained = []
    try:
        rng = np.random.default_rng(0)
        X = rng.standard_normal((16, 4)).astype(np.float32)
        y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 16)]
        # the tiny plan ignores the data: any (N, 4) / (N, 3) batch will do
        summary = run_worker(
            proxy.url, "mnist", X, y, model_version="1.0", max_cycles=1, min_wait=0.1,
            on_trained=lambda job, result: trained.append(result.params),
        )
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert (summary.cycles, summary.errors) == (1, 1)
    assert len(trained) == 2  # trained twice: once for the cut report, once to report
    cycles = admin.status()["cycles"]
    assert [(c["status"], c["reported"]) for c in cycles] == [("expired", 0), ("completed", 1)]
    assert [c["number"] for c in admin.status()["checkpoints"]] == [1, 2]
    for a, b in zip(admin.checkpoint(2), trained[-1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
