"""Downloads over the WebSocket (gridfl extension, docs/protocol.md "Binary frames"): on a
socket that negotiated ``gridfl.binary.2`` a get-model / get-plan / get-protocol request
frame is answered by one binary frame holding exactly the HTTP GET's body, and every error
is the HTTP route's (same status, same message) in the JSON error envelope. On other
sockets (syft.js's, which offers no subprotocol; one that offered only the never-released
``gridfl.binary-report.1``) these types stay unknown. The
bad-input matrix runs every download case over the socket too (test_bad_input.py,
``[wsdl]``)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from websockets.sync.client import connect

from gridfl import state
from tests.builders import b64, host_payload, training_plan
from tests.harness import Admin, HttpWorker, join

V2 = "gridfl.binary.2"
DROPPED = "gridfl.binary-report.1"  # never released, no longer selected
GET_MODEL = "model-centric/get-model"
GET_PLAN = "model-centric/get-plan"
GET_PROTOCOL = "model-centric/get-protocol"


def _socket(server, offered=(V2,)):
    return connect(server.ws_url, subprotocols=list(offered) or None, max_size=None,
                   open_timeout=20)


def _request(ws, kind: str, data: dict, request_id: str | None = "rid") -> str | bytes:
    frame = {"type": kind, "data": data}
    if request_id is not None:
        frame["request_id"] = request_id
    ws.send(json.dumps(frame))
    return ws.recv(timeout=60)


def _split(frame: bytes) -> tuple[dict, bytes]:
    """A binary reply as docs/protocol.md draws it: 4-byte big-endian header length, the
    UTF-8 JSON header, then the bytes."""
    n = int.from_bytes(frame[:4], "big")
    return json.loads(frame[4 : 4 + n].decode("utf-8")), frame[4 + n :]


@pytest.fixture
def joined(server):
    """A process with a tfjs plan variant and a protocol, and a worker accepted into its
    cycle: (http worker, the three downloads' queries)."""
    admin = Admin(server.url)
    payload = host_payload(
        plans={"training_plan": {"onnx": b64(training_plan()), "tfjs": b64(b"TFJS")}},
        protocols={"secure_agg": b"PROTO"},
    )
    assert admin.host(payload).status_code == 201
    w = HttpWorker(server.url)
    wid, cyc = join(w)
    keys = {"worker_id": wid, "request_key": cyc["request_key"]}
    queries = {
        GET_MODEL: {**keys, "model_id": cyc["model_id"]},
        GET_PLAN: {**keys, "plan_id": cyc["plans"]["training_plan"]},
        GET_PROTOCOL: {**keys, "protocol_id": cyc["protocols"]["secure_agg"]},
    }
    yield w, queries
    w.close()


@pytest.mark.parametrize(
    ("offered", "selected"),
    [
        ([V2], V2),  # what gridfl's worker offers
        ([DROPPED, V2], V2),
        (["chat", V2], V2),
        ([DROPPED], None),  # the dropped subprotocol is not selected: JSON only
        (["chat"], None),
        ([], None),  # syft.js
    ],
)
def test_handshake_selects_gridfl_binary_2_only(server, offered, selected):
    with _socket(server, offered) as ws:
        assert ws.subprotocol == selected


@pytest.mark.parametrize("kind", [GET_MODEL, GET_PLAN, GET_PROTOCOL])
def test_download_is_the_http_body(server, joined, kind):
    w, queries = joined
    http = w.get(kind.split("/")[1], **queries[kind])
    assert http.status_code == 200 and http.content
    with _socket(server) as ws:
        reply = _request(ws, kind, queries[kind])
        assert isinstance(reply, bytes)
        header, payload = _split(reply)
        assert header == {"type": kind, "request_id": "rid"}
        assert payload == http.content
        # no request_id (syft.js 0.1.4 style): none in the reply either
        header, payload = _split(_request(ws, kind, queries[kind], request_id=None))
        assert header == {"type": kind} and payload == http.content
    if kind == GET_MODEL:
        np.testing.assert_array_equal(state.loads(payload)[0], state.loads(http.content)[0])


def test_plan_variants_over_the_socket(server, joined):
    _, queries = joined
    q = queries[GET_PLAN]
    with _socket(server) as ws:
        _, tfjs = _split(_request(ws, GET_PLAN, {**q, "receive_operations_as": "tfjs"}))
        _, default = _split(_request(ws, GET_PLAN, q))
        _, onnx = _split(_request(ws, GET_PLAN, {**q, "receive_operations_as": "onnx"}))
    assert tfjs == b"TFJS" and default == onnx == training_plan()


@pytest.mark.parametrize("offered", [[DROPPED], []], ids=["binary-report.1", "none"])
@pytest.mark.parametrize("kind", [GET_MODEL, GET_PLAN, GET_PROTOCOL])
def test_downloads_are_unknown_without_the_subprotocol(server, joined, offered, kind):
    _, queries = joined
    with _socket(server, offered) as ws:
        reply = json.loads(_request(ws, kind, queries[kind]))
    assert reply == {"type": kind, "request_id": "rid", "data": {
        "error": f"unknown message type {kind!r}", "status_code": 400}}


def _bad_queries(q: dict) -> list[tuple[str, str, dict]]:
    model, plan, protocol = q[GET_MODEL], q[GET_PLAN], q[GET_PROTOCOL]
    without = lambda d, k: {x: v for x, v in d.items() if x != k}  # noqa: E731
    return [
        ("no-params", GET_MODEL, {}),
        ("no-model_id", GET_MODEL, without(model, "model_id")),
        ("model_id-not-int", GET_MODEL, {**model, "model_id": "one"}),
        ("model_id-huge", GET_MODEL, {**model, "model_id": "9" * 30}),
        ("unknown-model", GET_MODEL, {**model, "model_id": 987654}),
        ("wrong-key", GET_MODEL, {**model, "request_key": "f" * 64}),
        ("no-key", GET_MODEL, without(model, "request_key")),
        ("unknown-worker", GET_MODEL, {**model, "worker_id": "w"}),
        ("nul-in-worker", GET_MODEL, {**model, "worker_id": "a\x00b"}),
        ("unknown-plan", GET_PLAN, {**plan, "plan_id": 987654}),
        ("unknown-variant", GET_PLAN, {**plan, "receive_operations_as": "pickle"}),
        ("plan-wrong-key", GET_PLAN, {**plan, "request_key": "0" * 64}),
        ("unknown-protocol", GET_PROTOCOL, {**protocol, "protocol_id": 987654}),
        ("protocol-id-not-int", GET_PROTOCOL, {**protocol, "protocol_id": "x"}),
    ]


def test_errors_are_the_http_routes(server, joined):
    """Each bad request gets the HTTP route's status and message, in the JSON envelope with
    its request_id; the socket stays open throughout."""
    w, queries = joined
    with _socket(server) as ws:
        for name, kind, query in _bad_queries(queries):
            http = w.get(kind.split("/")[1], **query)
            assert http.status_code >= 400, (name, http.text)
            rid = uuid.uuid4().hex
            reply = json.loads(_request(ws, kind, query, request_id=rid))
            assert reply == {"type": kind, "request_id": rid, "data": {
                "error": http.json()["error"], "status_code": http.status_code}}, name
        _, payload = _split(_request(ws, GET_MODEL, queries[GET_MODEL]))
        assert payload == w.get("get-model", **queries[GET_MODEL]).content


def test_no_open_cycle_is_the_http_error(server, joined):
    """After the cycle closes the key is refused over the socket exactly as over HTTP."""
    w, queries = joined
    admin = Admin(server.url)
    r = admin.http.post("/gridfl/v1/processes/mnist/1.0/stop")
    assert r.status_code == 200, r.text
    http = w.get("get-model", **queries[GET_MODEL])
    assert http.status_code in (400, 401), http.text
    with _socket(server) as ws:
        reply = json.loads(_request(ws, GET_MODEL, queries[GET_MODEL]))
    assert reply["data"] == {"error": http.json()["error"], "status_code": http.status_code}


def test_max_bytes(server, joined):
    """``max_bytes`` (the client's frame limit) admits a payload of exactly that size; a
    larger one is a 413 naming the sizes, so the client can fetch it over HTTP."""
    w, queries = joined
    q = queries[GET_MODEL]
    size = len(w.get("get-model", **q).content)
    with _socket(server) as ws:
        _, payload = _split(_request(ws, GET_MODEL, {**q, "max_bytes": size}))
        assert len(payload) == size
        reply = json.loads(_request(ws, GET_MODEL, {**q, "max_bytes": size - 1}))
        assert reply["data"]["status_code"] == 413
        assert reply["data"]["error"] == (
            f"the model is {size} bytes, more than the {size - 1} bytes this socket takes "
            "('max_bytes'): download it over HTTP (GET /model-centric/get-model)")
        for bad in ("10", -1, True, 1.5):
            reply = json.loads(_request(ws, GET_MODEL, {**q, "max_bytes": bad}))
            assert reply["data"] == {"error": "'max_bytes' must be a non-negative integer",
                                     "status_code": 400}, bad
        # the key is checked before the size: a wrong key with a tiny limit is still a 401
        reply = json.loads(_request(ws, GET_MODEL, {**q, "request_key": "f" * 64,
                                                    "max_bytes": 1}))
        assert reply["data"]["status_code"] == 401


def test_download_as_a_binary_request_frame_is_refused(server, joined):
    """Requests are JSON text; a get-model sent as a binary frame is a 400."""
    _, queries = joined
    head = json.dumps({"type": GET_MODEL, "request_id": "b", "data": queries[GET_MODEL]})
    with _socket(server) as ws:
        ws.send(len(head).to_bytes(4, "big") + head.encode() + b"x")
        reply = json.loads(ws.recv(timeout=60))
    assert reply["data"]["status_code"] == 400
    assert "only 'model-centric/report' and 'model-centric/secure-aggregation'" in (
        reply["data"]["error"]
    )


def test_large_model_and_interleaved_requests(server_factory):
    """A model larger than the node's frame limit for requests (max_body_bytes bounds what
    the node reads, not what it sends) arrives whole in one frame; several downloads and
    JSON requests in flight on one socket are each answered under their request_id."""
    srv = server_factory(max_body_bytes=1 << 20)
    shapes = [(1024, 1024), (1024,)]  # 4 MiB of float32
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    admin = Admin(srv.url)
    payload = host_payload(params=params, plans={"training_plan": b64(training_plan(shapes))})
    assert admin.host(payload).status_code == 201
    w = HttpWorker(srv.url)
    try:
        wid, cyc = join(w)
        q = {"worker_id": wid, "request_key": cyc["request_key"], "model_id": cyc["model_id"]}
        pq = {"worker_id": wid, "request_key": cyc["request_key"],
              "plan_id": cyc["plans"]["training_plan"]}
        with _socket(srv) as ws:
            frames = [("m1", GET_MODEL, q), ("p", GET_PLAN, pq), ("m2", GET_MODEL, q),
                      ("ping", "socket-ping", {})]
            for rid, kind, data in frames:
                ws.send(json.dumps({"type": kind, "request_id": rid, "data": data}))
            got = {}
            for _ in frames:
                raw = ws.recv(timeout=120)
                if isinstance(raw, bytes):
                    header, body = _split(raw)
                    got[header["request_id"]] = body
                else:
                    got[json.loads(raw)["request_id"]] = json.loads(raw)
        assert got["ping"] == {"alive": "True", "request_id": "ping"}
        assert got["p"] == training_plan(shapes)
        assert got["m1"] == got["m2"] == w.get("get-model", **q).content
        assert len(got["m1"]) > 4 << 20
        for a, b in zip(state.loads(got["m1"]), params, strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        w.close()
