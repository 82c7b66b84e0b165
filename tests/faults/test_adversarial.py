"""Every class of hostile input, one after another, against one real ``gridfl serve`` process;
then a legitimate worker completes a cycle and the checkpoint is exactly current - its diff.

The classes (docs/reliability.md, "Adversarial input"): finite inputs that would make the
model non-finite, values JSON cannot carry, strings that crash a library, parser work out
of proportion to the bytes, slow uploads, unbounded headers, and the smaller rough edges.
Each class has its own detailed tests; this one shows the node survives all of them
together, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gridfl import _messages, state
from gridfl import _protobuf as pw
from tests.builders import ADMIN, SHAPES, host_payload

AUTH, CYCLE, REPORT = _messages.AUTHENTICATE, _messages.CYCLE_REQUEST, _messages.REPORT
N_MAX = _messages.MAX_NUM_SAMPLES


def _strict(text):
    def refuse(name):
        raise AssertionError(f"the node sent {name}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


class Worker:
    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=60)

    def post(self, kind: str, data) -> tuple[int, dict]:
        body = data if isinstance(data, (bytes, str)) else json.dumps(data)
        r = self.http.post("/" + kind, content=body)
        return r.status_code, _strict(r.content)

    def join(self, name: str) -> tuple[str, str]:
        st, auth = self.post(AUTH, {"model_name": name})
        assert st == 200, auth
        st, cyc = self.post(CYCLE, {"worker_id": auth["worker_id"], "model": name})
        assert st == 200 and cyc["status"] == "accepted", cyc
        return auth["worker_id"], cyc["request_key"]

    def report(self, wid: str, key: str, diff, **extra) -> tuple[int, dict]:
        raw = diff if isinstance(diff, bytes) else state.dumps(diff)
        data = {"worker_id": wid, "request_key": key,
                "diff": base64.b64encode(raw).decode(), **extra}
        return self.post(REPORT, data)


def _admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"})


def _ws_error(ws_url: str, frame: str | bytes) -> dict:
    with connect(ws_url, max_size=None, open_timeout=20) as ws:
        ws.send(frame)
        return _strict(ws.recv(timeout=30))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def node(request, serve_factory, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'grid.db'}"
    else:
        url = request.getfixturevalue("pg_fresh_db")
    return serve_factory(url)


def test_the_node_survives_every_class_and_stays_exact(node):
    admin, w = _admin(node.url), Worker(node.url)
    r = admin.post("/gridfl/v1/processes",
                   json=host_payload("g", server_config={"max_diffs": 1, "num_cycles": 0}))
    assert r.status_code == 201, r.text

    # 1. finite inputs that would make the model non-finite
    for value, extra in ((3e38, {}), (1e23, {"num_samples": N_MAX})):
        wid, key = w.join("g")
        st, body = w.report(wid, key, [np.full(s, value, np.float32) for s in SHAPES], **extra)
        assert st == 400 and "beyond ±1e+12" in body["error"], body

    # 2. values JSON cannot carry: a huge weighted metric is accepted, and status stays JSON
    wid, key = w.join("g")
    small = [np.full(s, 1e-3, np.float32) for s in SHAPES]
    st, body = w.report(wid, key, small, num_samples=N_MAX, metrics={"loss": 1e300})
    assert st == 200, body
    status = _strict(admin.get("/gridfl/v1/processes/g/1.0").content)
    assert status["cycles"][0]["metrics"] == {"loss": 1e300}
    bad_host = json.dumps(host_payload("nan")).replace(
        '"client_config": {', '"client_config": {"decay": NaN, ', 1)
    r = admin.post("/gridfl/v1/processes", content=bad_host)
    assert r.status_code == 400 and "'client_config.decay'" in r.json()["error"], r.text
    for literal in ("NaN", "1e400"):
        reply = _ws_error(node.ws_url, f'{{"type": "{AUTH}", "request_id": {literal}, '
                                       '"data": {"model_name": "g"}}')
        assert reply["data"]["status_code"] == 400 and "request_id" not in reply, reply

    # 3. strings that crash a library: a lone surrogate in the JWT field, over HTTP and WS
    st, body = w.post(AUTH, '{"model_name": "g", "auth_token": "\\ud800"}')
    assert st == 400 and "'auth_token' is not valid Unicode" in body["error"], body
    reply = _ws_error(node.ws_url, json.dumps(
        {"type": AUTH, "data": {"model_name": "g", "auth_token": "\ud800"}}))
    assert reply["data"]["status_code"] == 400, reply

    # 4. parser work out of proportion to the bytes: many empty tensors, many placeholders
    empty = pw.len_field(2, pw.len_field(1, pw.len_field(2, pw.len_field(2, b"float32"))))
    placeholder = pw.len_field(1, pw.len_field(3, pw.varint_field(1, 0)))
    for hostile in (empty * 200_000, placeholder * 500_000 + state.dumps(small)):
        wid, key = w.join("g")
        st, body = w.report(wid, key, hostile)
        assert st == 400 and "not valid State bytes" in body["error"], body

    # 5. slow uploads: report heads and 15 bytes of body, then silence, kept to the end
    stalled = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=30)
        sock.sendall(f"POST /{REPORT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     "\r\nContent-Length: 9000000\r\n\r\n".encode() + b'{"worker_id": ')
        stalled.append(sock)

    # 6. unbounded headers: one 16 MB line, then 250,000 small ones
    for head in (b"X-Big: " + b"a" * (16 << 20) + b"\r\n", b"X-A: b\r\n" * 250_000):
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
            # refused before it was all sent: the answer is still readable
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 431"), "a flood of header bytes"

    # 7. smaller rough edges
    for server_config in ({"cycle_length": 1e-9},):
        r = admin.post("/gridfl/v1/processes",
                       json=host_payload("edge", server_config=server_config))
        assert r.status_code == 400 and "cycle_length" in r.json()["error"], r.text
    wid, key = w.join("g")
    for metrics in ([], False):
        st, body = w.report(wid, key, small, metrics=metrics)
        assert st == 400 and "'metrics' must be an object" in body["error"], body
    with connect(node.ws_url, open_timeout=20) as ws:
        ws.send(b"\xff\xfe not utf-8", text=True)  # a text frame that is not UTF-8
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1007

    # finally, with the uploads still stalled: one legitimate report (the seat taken
    # above), counted exactly
    current = state.loads(admin.get("/gridfl/v1/processes/g/1.0/checkpoints/latest").content)
    diff = [np.random.default_rng(7).standard_normal(s).astype(np.float32) for s in SHAPES]
    st, body = w.report(wid, key, diff)
    assert st == 200, body
    new = state.loads(admin.get("/gridfl/v1/processes/g/1.0/checkpoints/latest").content)
    assert all(np.array_equal(n, c - d) for n, c, d in zip(new, current, diff, strict=True))
    for sock in stalled:
        sock.close()
    assert "Traceback" not in node.log.read_text(), node.log.read_text()[-3000:]
