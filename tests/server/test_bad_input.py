"""The bad-input matrix (issue 6): every case is sent to a real node (uvicorn on loopback),
over HTTP and over the WebSocket where the call exists on both, and must get a clear 4xx
(WebSocket: ``data.error`` + ``data.status_code``) with a helpful message, and leave the
node unchanged: same status (reported counts, cycles, checkpoints), same checkpoint bytes,
and no new or changed database rows (every table is compared row by row).

The node is set up once per module with processes and workers in every interesting state
(accepted, already reported, accepted into a cycle that has closed, bound to another
process, JWT-protected, speed-tested). docs/reliability.md "## Bad input" lists the cases
and their outcomes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import numpy as np
import pytest
import sqlalchemy as sa
from websockets.sync.client import connect

from gridfl import _messages, state
from gridfl import _protobuf as pw
from gridfl.server import tables
from tests.builders import (
    ADMIN,
    SHAPES,
    averaging_plan,
    b64,
    diff_of,
    host_payload,
    proximal_training_plan,
    rsa_key_pair,
    training_plan,
)
from tests.harness import LiveNode, make_settings

AUTH = _messages.AUTHENTICATE
CYCLE = _messages.CYCLE_REQUEST
REPORT = _messages.REPORT
SECRET = "a-long-enough-hmac-secret-for-the-bad-input-tests-also-for-hs512-0123456789"
MAX_BODY = 256 * 1024
MAX_ADMIN_BODY = 1024 * 1024


# --------------------------------------------------------------------------- keys and tokens
def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _hs256_with(secret: bytes, claims: dict | None = None) -> str:
    """An HS256 JWT built by hand (pyjwt refuses a PEM key as HMAC secret)."""
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(claims or {}).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"


# --------------------------------------------------------------------------- hostile State bytes
def _hostile_huge_length() -> bytes:
    # State.tensors (field 2, length-delimited) declaring 2**62 bytes, then 3 bytes
    return pw.key(2, pw.LEN) + pw.varint(1 << 62) + b"abc"


def _hostile_huge_shape() -> bytes:
    # a tensor declaring shape (2**31 - 1, 2**31 - 1) with 8 bytes of float32 contents
    dims = pw.varint((1 << 31) - 1) * 2
    td = (
        pw.len_field(1, pw.len_field(1, dims))
        + pw.len_field(2, b"float32")
        + pw.len_field(22, b"\0" * 8)
    )
    tt = pw.len_field(1, pw.varint_field(1, 0)) + pw.len_field(2, td) + pw.varint_field(8, 4)
    return pw.len_field(2, pw.len_field(1, tt))


def _hostile_deep_groups() -> bytes:
    return pw.key(5, pw.SGROUP) * 10_000


def _hostile_long_varint() -> bytes:
    return pw.key(2, pw.LEN) + b"\xff" * 20


def _float_diff(fill: float) -> list[np.ndarray]:
    d = diff_of(0)
    d[1] = d[1].copy()
    d[1][1] = fill
    return d


# --------------------------------------------------------------------------- the node
@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node with processes and workers in every state the cases need (built once)."""
    tmp = tmp_path_factory.mktemp("bad-input")
    srv = LiveNode(
        make_settings(
            f"sqlite:///{tmp / 'grid.db'}",
            tmp,
            max_body_bytes=MAX_BODY,
            max_admin_body_bytes=MAX_ADMIN_BODY,
        )
    )
    bare = LiveNode(make_settings(f"sqlite:///{tmp / 'bare.db'}", tmp, admin_token=None))
    admin = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    http = httpx.Client(base_url=srv.url, timeout=30)
    private, public = rsa_key_pair()
    other_private, _ = rsa_key_pair()

    def host(name: str, **cfg) -> dict:
        payload = host_payload(
            name=name, server_config={"cycle_length": 3600, "max_diffs": 5, **cfg}
        )
        if name == "mnist":
            payload["protocols"] = {"secure_agg": b64(b"protocol bytes")}
        r = admin.post("/gridfl/v1/processes", json=payload)
        assert r.status_code == 201, r.text
        return r.json()

    def call(kind: str, data: dict) -> dict:
        r = http.post("/" + kind, json=data)
        assert r.status_code == 200, r.text
        return r.json()

    def auth(name: str, token: str | None = None) -> str:
        data = {"model_name": name, "auth_token": token}
        return call(AUTH, data)["worker_id"]

    def accept(name: str) -> tuple[str, dict]:
        wid = auth(name)
        cyc = call(CYCLE, {"worker_id": wid, "model": name})
        assert cyc["status"] == "accepted", cyc
        return wid, cyc

    def do_report(wid: str, key: str, seed: int) -> None:
        diff = b64(state.dumps(diff_of(seed)))
        call(REPORT, {"worker_id": wid, "request_key": key, "diff": diff})

    mnist = host("mnist")
    other = host("other")
    host("closed", max_diffs=1)
    host("hs", authentication={"secret": SECRET})
    host("rs", authentication={"type": "jwt", "pub_key": public})
    host("speed", minimum_download_speed=10)

    a1, a1c = accept("mnist")  # accepted, will never report validly here
    a2, a2c = accept("mnist")  # accepted and reported (cycle stays open: max_diffs 5)
    do_report(a2, a2c["request_key"], 2)
    a3 = auth("mnist")  # authenticated, never asked for a cycle
    b1, b1c = accept("other")  # a worker of another process
    c1, c1c = accept("closed")  # reports and closes cycle 1, then joins cycle 2
    c2, c2c = accept("closed")  # accepted into cycle 1, never reported: its key is late now
    do_report(c1, c1c["request_key"], 1)
    c1c2 = call(CYCLE, {"worker_id": c1, "model": "closed"})
    assert c1c2["status"] == "accepted", c1c2
    s1 = auth("speed")
    # compressed reports (gridfl.binary.2): one process per encoding, a worker accepted in each
    zipped = {}
    for kind, cfg in (("float16", {"kind": "float16"}), ("int8", {"kind": "int8"}),
                      ("topk", {"kind": "topk", "fraction": 0.2})):
        host(f"zip-{kind}", compression=cfg)
        wid, cyc = accept(f"zip-{kind}")
        assert cyc["compression"] == {**cfg, **({"fraction": 0.2} if kind == "topk" else {})}
        zipped[kind] = (wid, cyc["request_key"])

    ctx = SimpleNamespace(
        srv=srv,
        bare=bare,
        admin=admin,
        http=http,
        public=public,
        private=private,
        other_private=other_private,
        model_id=mnist["model_id"],
        plan_id=mnist["plans"]["training_plan"],
        protocol_id=mnist["protocols"]["secure_agg"],
        other_model_id=other["model_id"],
        a1=a1,
        ka1=a1c["request_key"],
        a2=a2,
        ka2=a2c["request_key"],
        a3=a3,
        b1=b1,
        kb1=b1c["request_key"],
        c1=c1,
        kc1_old=c1c["request_key"],
        c2=c2,
        kc2=c2c["request_key"],
        s1=s1,
        zipped=zipped,
        processes=["mnist", "other", "closed", "hs", "rs", "speed",
                   "zip-float16", "zip-int8", "zip-topk"],
    )
    yield ctx
    admin.close()
    http.close()
    srv.stop()
    bare.stop()


def _digest(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha256:" + hashlib.sha256(bytes(value)).hexdigest()
    return value


def snapshot(ctx) -> dict:
    """What must not change: every database row (checkpoint bytes and running aggregates
    included, as digests), plus the admin API's view (status with reported counts, checkpoint
    bytes) of the two processes with history."""
    out: dict[str, Any] = {}
    for name in ("mnist", "closed"):
        r = ctx.admin.get(f"/gridfl/v1/processes/{name}/1.0")
        assert r.status_code == 200, r.text
        st = r.json()
        for c in [*st["cycles"], st["current"] or {}]:
            c.pop("deadline_in", None)
        out[f"status:{name}"] = st
        r = ctx.admin.get(f"/gridfl/v1/processes/{name}/1.0/checkpoints/latest")
        assert r.status_code == 200, r.text
        out[f"checkpoint:{name}:latest"] = _digest(r.content)
    with ctx.srv.node.engine.connect() as conn:
        for table in tables.metadata.sorted_tables:
            rows = conn.execute(sa.select(table)).all()
            out[f"table:{table.name}"] = sorted(
                (tuple(_digest(v) for v in row) for row in rows), key=repr
            )
    return out


# --------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """One bad input.

    Worker messages (``kind`` set) go over HTTP (``POST /<kind>``) and the WebSocket;
    ``data(ctx)`` is the JSON ``data`` (or ``raw(ctx)`` the exact body / frame text).
    Other calls (``kind`` None) are HTTP only: ``request(ctx) -> dict`` of httpx kwargs.
    """

    id: str
    status: int
    message: str  # a substring the error must contain (case-insensitive)
    kind: str | None = None
    data: Callable[[Any], Any] | None = None
    raw: Callable[[Any], str | bytes] | None = None
    request: Callable[[Any], dict] | None = None
    transports: tuple[str, ...] = ("http", "ws")
    ws_close: int | None = None  # the WebSocket closes with this code instead of replying
    tags: tuple[str, ...] = field(default=())


def W(id, kind, data, status, message, **kw) -> Case:
    return Case(id, status, message, kind=kind, data=data, **kw)


def H(id, request, status, message) -> Case:
    return Case(id, status, message, request=request, transports=("http",))


def WSONLY(id, raw, status, message, **kw) -> Case:
    return Case(id, status, message, kind="?", raw=raw, transports=("ws",), **kw)


def ZIP(id, kind, payload, status, message, *, process=None, transports=("wsz",)) -> Case:
    """A compressed binary report (``compression: kind``) by the worker accepted in process
    ``zip-<process or kind>``, on a socket that negotiated gridfl.binary.2 ("wsz")."""

    def raw(ctx) -> bytes:
        wid, key = ctx.zipped[process or kind] if process != "mnist" else (ctx.a1, ctx.ka1)
        data = {"worker_id": wid, "request_key": key, "compression": kind}
        return _bin(json.dumps({"type": REPORT, "request_id": "r", "data": data}).encode(),
                    payload)

    return Case(id, status, message, kind="?", raw=raw, transports=transports)


def _f16(*values: float) -> bytes:
    return np.array(values, "<f2").tobytes()


def _int8(scales, q=None) -> bytes:
    q = np.full(15, 127, "i1") if q is None else np.asarray(q, "i1")
    return np.asarray(scales, "<f4").tobytes() + q.tobytes()


def _topk(indices, values, count=None) -> bytes:
    n = len(indices) if count is None else count
    return (np.array([n], "<u4").tobytes() + np.asarray(indices, "<u4").tobytes()
            + np.asarray(values, "<f4").tobytes())


def DL(id, path, status, message, transports=("http", "wsdl"), **params) -> Case:
    """A download: an HTTP GET, and ("wsdl") the same query as the ``data`` of a request
    frame on a socket that negotiated gridfl.binary.2."""
    return Case(id, status, message, kind="model-centric/" + path,
                request=_asset(path, **params), transports=transports)


def _report(ctx, **over) -> dict:
    data = {"worker_id": ctx.a1, "request_key": ctx.ka1, "diff": b64(state.dumps(diff_of(1)))}
    data.update(over)
    return {k: v for k, v in data.items() if v is not _DROP}


def _bin(header: bytes, diff: bytes) -> bytes:
    return len(header).to_bytes(4, "big") + header + diff


def _bin_report(ctx, *, kind=REPORT, data=None, diff: bytes | None = None) -> bytes:
    """A binary report frame (request_id "r") with one part replaced."""
    diff = _GOOD_STATE if diff is None else diff
    header = {"type": kind, "request_id": "r",
              "data": data if data is not None else _report(ctx, diff=_DROP)}
    header = {k: v for k, v in header.items() if v is not _DROP}
    return _bin(json.dumps(header).encode(), diff)


#: report cases whose ``diff`` is not base64 of anything: a binary frame cannot carry it
#: (its own cases above: no diff bytes, a diff in the header)
_NOT_BINARY = {"report-missing-diff", "report-diff-number", "report-diff-not-base64",
               "report-diff-urlsafe-base64", "report-diff-empty",
               "report-compressed-as-json"}


def _diff(arrays_or_bytes) -> Callable[[Any], dict]:
    def data(ctx):
        blob = arrays_or_bytes
        if not isinstance(blob, bytes):
            blob = state.dumps(blob)
        return _report(ctx, diff=b64(blob))

    return data


_DROP = object()
_NOW = int(time.time())
_GOOD_STATE = state.dumps(diff_of(1))


def _admin_req(method, path, *, token: str | None = ADMIN, **kw) -> Callable[[Any], dict]:
    def request(ctx):
        headers = dict(kw.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return {"method": method, "url": path, "headers": headers, **kw}

    return request


def _host(mutate: Callable[[dict, Any], Any], *, token: str | None = ADMIN, raw=None):
    """A host request built from a valid payload (name 'fresh') by ``mutate``."""
    URL = "/gridfl/v1/processes"

    def request(ctx):
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if raw is not None:
            return {"method": "POST", "url": URL, "headers": headers, "content": raw}
        payload = host_payload(name="fresh", server_config={"cycle_length": 3600})
        mutate(payload, ctx)
        return {"method": "POST", "url": URL, "headers": headers, "json": payload}

    return request


def _host_json(**client_config_literals: str) -> bytes:
    """A valid host body with JSON literals spliced into its client_config (NaN, 1e999 and
    lone surrogates, which json.dumps would not write)."""
    payload = host_payload(name="fresh", server_config={"cycle_length": 3600})
    text = json.dumps(payload)
    head, _, tail = text.partition('"client_config": {')
    extra = "".join(f'"{k}": {v}, ' for k, v in client_config_literals.items())
    return (head + '"client_config": {' + extra + tail).encode()


def _sc(**cfg):
    def mutate(p, ctx):
        p["server_config"].update(cfg)

    return mutate


def _set(key, value):
    def mutate(p, ctx):
        if value is _DROP:
            p.pop(key)
        else:
            p[key] = value

    return mutate


def _asset(path, **params):
    def request(ctx):
        q = {
            "worker_id": ctx.a1,
            "request_key": ctx.ka1,
            "model_id": ctx.model_id,
            "plan_id": ctx.plan_id,
            "protocol_id": ctx.protocol_id,
        }
        if path == "get-model":
            q.pop("plan_id"), q.pop("protocol_id")
        elif path == "get-plan":
            q.pop("model_id"), q.pop("protocol_id")
        else:
            q.pop("model_id"), q.pop("plan_id")
        for k, v in params.items():
            v = v(ctx) if callable(v) else v
            if v is _DROP:
                q.pop(k, None)
            else:
                q[k] = v
        return {"method": "GET", "url": f"/model-centric/{path}", "params": q}

    return request


_inv = _messages.MSG_AUTH_INVALID
_deep = "[" * 4000 + "]" * 4000  # under the value cap, deeper than the decoder recurses
_many = "[" + "0," * 5000 + "0]"

# One case per line or two: a table reads better than one argument per line.
# fmt: off
CASES: list[Case] = [
    # ---- malformed JSON and non-object bodies, every worker call
    *[
        W(f"{k.split('/')[1]}-malformed-json", k, None, 400, "not valid JSON",
          raw=lambda ctx: '{"model_name": "mnist",')
        for k in (AUTH, CYCLE, REPORT)
    ],
    *[
        W(f"{k.split('/')[1]}-body-{name}", k, (lambda v: lambda ctx: v)(value), 400,
          "expected a JSON object", transports=("http",))
        for k in (AUTH, CYCLE, REPORT)
        for name, value in (("list", []), ("string", "mnist"), ("number", 42))
    ],
    W("auth-body-null", AUTH, lambda ctx: None, 400, "expected a JSON object",
      transports=("http",)),
    W("auth-not-utf8", AUTH, None, 400, "not valid JSON", raw=lambda ctx: b"\xff\xfe{}",
      transports=("http",)),
    W("auth-deeply-nested-json", AUTH, None, 400, "nested", raw=lambda ctx: _deep),
    W("auth-many-json-values", AUTH, None, 400, "more than 4096 JSON values",
      raw=lambda ctx: _many),
    W("auth-huge-integer-literal", AUTH, None, 400, "not valid JSON",
      raw=lambda ctx: '{"model_name": ' + "9" * 5000 + "}"),
    W("auth-model_name-4000-digit-integer", AUTH, lambda ctx: {"model_name": 10**4000}, 400,
      "'model_name' is an integer beyond the float range"),
    W("auth-empty-body", AUTH, None, 400, "not valid JSON", raw=lambda ctx: "",
      transports=("http",)),
    # ---- missing fields, wrong types, out-of-range values
    W("auth-missing-model_name", AUTH, lambda ctx: {}, 400, "'model_name' is required"),
    W("auth-model_name-list", AUTH, lambda ctx: {"model_name": ["mnist"]}, 400,
      "'model_name' must be a string"),
    W("auth-model_name-bool", AUTH, lambda ctx: {"model_name": True}, 400,
      "'model_name' must be a string"),
    W("auth-model_name-empty", AUTH, lambda ctx: {"model_name": ""}, 400,
      "'model_name' must not be empty"),
    W("auth-model_name-too-long", AUTH, lambda ctx: {"model_name": "m" * 5000}, 400,
      "too long"),
    W("auth-model_name-nul", AUTH, lambda ctx: {"model_name": "mn\x00ist"}, 400,
      "control character"),
    W("auth-model_name-lone-surrogate", AUTH, None, 400, "surrogate",
      raw=lambda ctx: '{"model_name": "\\ud800"}'),
    W("auth-token-lone-surrogate", AUTH, None, 400, "'auth_token' is not valid Unicode",
      raw=lambda ctx: '{"model_name": "hs", "auth_token": "\\ud800"}'),
    W("auth-surrogate-in-an-unknown-field", AUTH, None, 400, "'extra.x' is not valid Unicode",
      raw=lambda ctx: '{"model_name": "mnist", "extra": {"x": "a\\udfffb"}}'),
    W("auth-token-number", AUTH, lambda ctx: {"model_name": "hs", "auth_token": 5}, 400,
      "'auth_token' must be a string"),
    W("cycle-missing-worker_id", CYCLE, lambda ctx: {"model": "mnist"}, 400,
      "'worker_id' is required"),
    W("cycle-missing-model", CYCLE, lambda ctx: {"worker_id": ctx.a3}, 400,
      "'model' is required"),
    W("cycle-worker_id-object", CYCLE, lambda ctx: {"worker_id": {}, "model": "mnist"}, 400,
      "'worker_id' must be a string"),
    W("cycle-ping-string", CYCLE,
      lambda ctx: {"worker_id": ctx.a3, "model": "mnist", "ping": "fast"}, 400,
      "'ping' needs to be a positive number"),
    W("cycle-download-negative", CYCLE,
      lambda ctx: {"worker_id": ctx.a3, "model": "mnist", "download": -1}, 400,
      "'download' needs to be a positive number"),
    W("cycle-upload-infinity", CYCLE, None, 400, "'upload' is not a finite number",
      raw=lambda ctx: json.dumps({"worker_id": ctx.a3, "model": "mnist", "upload": 1e999})),
    W("cycle-ping-NaN", CYCLE, None, 400, "'ping' is not a finite number",
      raw=lambda ctx: json.dumps({"worker_id": ctx.a3, "model": "mnist", "ping": float("nan")})),
    W("cycle-ping-huge-int", CYCLE,
      lambda ctx: {"worker_id": ctx.a3, "model": "mnist", "ping": 10**400}, 400,
      "'ping' is an integer beyond the float range"),
    W("cycle-wait-too-long", CYCLE,
      lambda ctx: {"worker_id": ctx.a3, "model": "mnist", "wait": 3600}, 400, "'wait' must be"),
    W("cycle-speed-test-fields-missing", CYCLE,
      lambda ctx: {"worker_id": ctx.s1, "model": "speed"}, 400, "'ping' is required"),
    W("report-missing-worker_id", REPORT, lambda ctx: _report(ctx, worker_id=_DROP), 400,
      "'worker_id' is required"),
    W("report-missing-request_key", REPORT, lambda ctx: _report(ctx, request_key=_DROP), 400,
      "'request_key' is required"),
    W("report-missing-diff", REPORT, lambda ctx: _report(ctx, diff=_DROP), 400,
      "'diff' must be a non-empty base64 string"),
    W("report-diff-number", REPORT, lambda ctx: _report(ctx, diff=12), 400,
      "'diff' must be a non-empty base64 string"),
    W("report-num_samples-zero", REPORT, lambda ctx: _report(ctx, num_samples=0), 400,
      "'num_samples' must be a positive integer"),
    W("report-num_samples-float", REPORT, lambda ctx: _report(ctx, num_samples=1.5), 400,
      "'num_samples' must be a positive integer"),
    W("report-num_samples-bool", REPORT, lambda ctx: _report(ctx, num_samples=True), 400,
      "'num_samples' must be a positive integer"),
    W("report-num_samples-huge", REPORT, lambda ctx: _report(ctx, num_samples=10**30), 400,
      "'num_samples' must be a positive integer"),
    W("report-metrics-list", REPORT, lambda ctx: _report(ctx, metrics=[1]), 400,
      "'metrics' must be an object"),
    W("report-metrics-empty-list", REPORT, lambda ctx: _report(ctx, metrics=[]), 400,
      "'metrics' must be an object"),
    W("report-metrics-false", REPORT, lambda ctx: _report(ctx, metrics=False), 400,
      "'metrics' must be an object"),
    W("report-metric-string", REPORT, lambda ctx: _report(ctx, metrics={"acc": "high"}), 400,
      "metric 'acc' must be a finite number"),
    W("report-metric-huge-int", REPORT, lambda ctx: _report(ctx, metrics={"acc": 10**400}), 400,
      "'metrics.acc' is an integer beyond the float range"),
    W("report-metric-NaN", REPORT, None, 400, "'metrics.loss' is not a finite number",
      raw=lambda ctx: json.dumps(_report(ctx, metrics={"loss": float("nan")}))),
    W("report-too-many-metrics", REPORT,
      lambda ctx: _report(ctx, metrics={f"m{i}": 1 for i in range(33)}), 400, "at most 32"),
    # ---- the diff: base64, truncated / garbage / hostile State, wrong tensors, NaN / Inf
    W("report-diff-not-base64", REPORT, lambda ctx: _report(ctx, diff="@@not base64@@"), 400,
      "'diff' is not valid base64"),
    W("report-diff-urlsafe-base64", REPORT,
      lambda ctx: _report(ctx, diff=base64.urlsafe_b64encode(b"\xfb\xff" * 8).decode()), 400,
      "'diff' is not valid base64"),
    W("report-diff-empty", REPORT, lambda ctx: _report(ctx, diff=""), 400,
      "'diff' must be a non-empty base64 string"),
    W("report-diff-garbage", REPORT, _diff(b"\x07garbage bytes"), 400,
      "diff is not valid State bytes"),
    W("report-diff-truncated", REPORT, _diff(_GOOD_STATE[: len(_GOOD_STATE) // 2]), 400,
      "diff is not valid State bytes"),
    W("report-diff-huge-declared-length", REPORT, _diff(_hostile_huge_length()), 400,
      "declares 4611686018427387904 bytes"),
    W("report-diff-huge-declared-shape", REPORT, _diff(_hostile_huge_shape()), 400,
      "diff is not valid State bytes"),
    W("report-diff-deep-groups", REPORT, _diff(_hostile_deep_groups()), 400,
      "more than 64 fields (the limit for a State of 2 tensors)"),
    W("report-diff-11-byte-varint", REPORT, _diff(_hostile_long_varint()), 400,
      "varint longer than 10 bytes"),
    W("report-diff-plan-bytes", REPORT, _diff(training_plan()), 400,
      "diff is not valid State bytes"),
    W("report-diff-no-tensors", REPORT, _diff(state.dumps([]) + pw.len_field(1, b"")), 400,
      "State has 0 tensors; expected 2"),
    W("report-diff-one-tensor-too-few", REPORT, _diff(diff_of(1)[:1]), 400,
      "State has 1 tensors; expected 2"),
    W("report-diff-one-tensor-too-many", REPORT, _diff([*diff_of(1), np.zeros(3, np.float32)]),
      400, "State has more than 2 placeholders (byte 51); expected 2"),
    W("report-diff-wrong-shape", REPORT,
      _diff([np.zeros((3, 4), np.float32), np.zeros(3, np.float32)]), 400,
      "State tensor 0 is float32[3, 4] (TensorData at byte 61); expected float32[4, 3]"),
    W("report-diff-wrong-dtype-float64", REPORT,
      _diff([a.astype(np.float64) for a in diff_of(1)]), 400,
      "State tensor 0 is float64[4, 3] (TensorData at byte 61); expected float32[4, 3]"),
    W("report-diff-wrong-dtype-int32", REPORT,
      _diff([np.zeros(s, np.int32) for s in SHAPES]), 400, "State tensor 0 is int32[4, 3]"),
    W("report-diff-NaN", REPORT, _diff(_float_diff(float("nan"))), 400,
      "diff tensor 1 has NaN or infinite values"),
    W("report-diff-Inf", REPORT, _diff(_float_diff(float("inf"))), 400,
      "diff tensor 1 has NaN or infinite values"),
    W("report-diff-minus-Inf", REPORT, _diff(_float_diff(float("-inf"))), 400,
      "diff tensor 1 has NaN or infinite values"),
    W("report-diff-finite-but-huge", REPORT, _diff(_float_diff(3e38)), 400,
      "diff tensor 1 has values beyond ±1e+12"),
    W("report-diff-1e23", REPORT, _diff(_float_diff(-1e23)), 400,
      "diff tensor 1 has values beyond ±1e+12"),
    # ---- request keys, foreign workers, closed cycles, double reports
    W("report-unknown-worker", REPORT, lambda ctx: _report(ctx, worker_id=str(uuid.uuid4())),
      400, "Worker ID not found!"),
    W("report-random-request_key", REPORT, lambda ctx: _report(ctx, request_key="0" * 64), 401,
      "Invalid request key!"),
    W("report-foreign-request_key-same-cycle", REPORT,
      lambda ctx: _report(ctx, request_key=ctx.ka2), 401, "Invalid request key!"),
    W("report-worker-of-A-with-key-of-B", REPORT,
      lambda ctx: _report(ctx, request_key=ctx.kb1), 401, "Invalid request key!"),
    W("report-worker-not-accepted", REPORT,
      lambda ctx: _report(ctx, worker_id=ctx.a3, request_key=ctx.ka1), 401,
      "Invalid request key!"),
    W("report-double", REPORT,
      lambda ctx: _report(ctx, worker_id=ctx.a2, request_key=ctx.ka2), 409,
      "already reported for cycle 1"),
    W("report-replayed-key-of-previous-cycle", REPORT,
      lambda ctx: _report(ctx, worker_id=ctx.c1, request_key=ctx.kc1_old), 409,
      "already reported for cycle 1"),
    W("report-after-cycle-closed", REPORT,
      lambda ctx: _report(ctx, worker_id=ctx.c2, request_key=ctx.kc2), 409,
      "cycle 1 is closed (completed): the report came too late"),
    W("cycle-unknown-worker", CYCLE, lambda ctx: {"worker_id": "nobody", "model": "mnist"}, 400,
      "Worker ID not found!"),
    W("cycle-worker-of-A-asks-B", CYCLE, lambda ctx: {"worker_id": ctx.a3, "model": "other"},
      403, "this worker_id was issued for 'mnist'"),
    W("cycle-wrong-version", CYCLE,
      lambda ctx: {"worker_id": ctx.a3, "model": "mnist", "version": "9.9"}, 403,
      "this worker_id was issued for 'mnist' version '1.0'"),
    # ---- unknown model / version
    W("auth-unknown-model", AUTH, lambda ctx: {"model_name": "nope"}, 404,
      "no FL process named 'nope'"),
    W("auth-unknown-version", AUTH, lambda ctx: {"model_name": "mnist", "model_version": "9.9"},
      404, "no FL process named 'mnist' version '9.9'"),
    # ---- JWTs
    W("jwt-missing", AUTH, lambda ctx: {"model_name": "hs"}, 400, _messages.MSG_AUTH_REQUIRED),
    W("jwt-empty", AUTH, lambda ctx: {"model_name": "hs", "auth_token": ""}, 400,
      _messages.MSG_AUTH_REQUIRED),
    W("jwt-garbage", AUTH, lambda ctx: {"model_name": "hs", "auth_token": "a.b.c"}, 400, _inv),
    W("jwt-hs256-expired", AUTH,
      lambda ctx: {"model_name": "hs",
                   "auth_token": jwt.encode({"exp": _NOW - 60}, SECRET, algorithm="HS256")},
      400, _inv),
    W("jwt-hs256-not-yet-valid", AUTH,
      lambda ctx: {"model_name": "hs",
                   "auth_token": jwt.encode({"nbf": _NOW + 3600}, SECRET, algorithm="HS256")},
      400, _inv),
    W("jwt-hs256-with-audience", AUTH,
      lambda ctx: {"model_name": "hs",
                   "auth_token": jwt.encode({"aud": "x"}, SECRET, algorithm="HS256")},
      400, _inv),
    W("jwt-hs256-wrong-secret", AUTH,
      lambda ctx: {"model_name": "hs",
                   "auth_token": jwt.encode({}, SECRET + "x", algorithm="HS256")},
      400, _inv),
    W("jwt-alg-none-hs", AUTH,
      lambda ctx: {"model_name": "hs", "auth_token": jwt.encode({}, None, algorithm="none")},
      400, _inv),
    W("jwt-hs512-with-the-secret", AUTH,
      lambda ctx: {"model_name": "hs", "auth_token": jwt.encode({}, SECRET, algorithm="HS512")},
      400, _inv),
    W("jwt-rs256-to-hs-process", AUTH,
      lambda ctx: {"model_name": "hs",
                   "auth_token": jwt.encode({}, ctx.private, algorithm="RS256")},
      400, _inv),
    W("jwt-alg-none-rs", AUTH,
      lambda ctx: {"model_name": "rs", "auth_token": jwt.encode({}, None, algorithm="none")},
      400, _inv),
    W("jwt-hs256-made-with-rs256-public-key", AUTH,
      lambda ctx: {"model_name": "rs", "auth_token": _hs256_with(ctx.public.encode())}, 400,
      _inv),
    W("jwt-rs256-wrongly-signed", AUTH,
      lambda ctx: {"model_name": "rs",
                   "auth_token": jwt.encode({}, ctx.other_private, algorithm="RS256")},
      400, _inv),
    W("jwt-rs256-expired", AUTH,
      lambda ctx: {"model_name": "rs",
                   "auth_token": jwt.encode({"exp": _NOW - 60}, ctx.private, algorithm="RS256")},
      400, _inv),
    W("jwt-rs256-signature-stripped", AUTH,
      lambda ctx: {"model_name": "rs",
                   "auth_token": jwt.encode({}, ctx.private, algorithm="RS256").rsplit(".", 1)[0]
                   + "."},
      400, _inv),
    # ---- oversized bodies
    W("report-oversized-body", REPORT, None, 413, "larger than the node accepts",
      raw=lambda ctx: json.dumps(_report(ctx, diff="A" * (MAX_BODY + 4))),
      transports=("http",)),
    W("report-oversized-frame", REPORT, None, 0, "",
      raw=lambda ctx: json.dumps(_report(ctx, diff="A" * (MAX_BODY + 4))),
      transports=("ws",), ws_close=1009),
    H("report-oversized-chunked-body",
      lambda ctx: {"method": "POST", "url": "/" + REPORT,
                   "content": iter([b"{" + b" " * (64 * 1024)] * 8)},
      413, "larger than the node accepts"),
    # ---- WebSocket-only frames
    WSONLY("ws-unknown-type", lambda ctx: json.dumps({"type": "model-centric/x", "data": {}}),
           400, "unknown message type 'model-centric/x'"),
    WSONLY("ws-missing-type", lambda ctx: json.dumps({"data": {}, "request_id": "r"}), 400,
           "message 'type' is required"),
    WSONLY("ws-type-number", lambda ctx: json.dumps({"type": 7, "data": {}}), 400,
           "message 'type' is required"),
    WSONLY("ws-data-list", lambda ctx: json.dumps({"type": AUTH, "data": [1]}), 400,
           "message 'data' must be an object"),
    WSONLY("ws-frame-list", lambda ctx: "[1, 2]", 400, "expected a JSON object"),
    WSONLY("ws-request_id-NaN",
           lambda ctx: f'{{"type": "{AUTH}", "request_id": NaN, "data": {{"model_name": "x"}}}}',
           400, "'request_id' is not a finite number"),
    WSONLY("ws-request_id-1e400",
           lambda ctx: f'{{"type": "{AUTH}", "request_id": 1e400, "data": {{"model_name": "x"}}}}',
           400, "'request_id' is not a finite number"),
    WSONLY("ws-request_id-lone-surrogate",
           lambda ctx: f'{{"type": "{AUTH}", "request_id": "\\ud800", "data": {{}}}}',
           400, "'request_id' is not valid Unicode"),
    WSONLY("ws-host-training",
           lambda ctx: json.dumps({"type": _messages.HOST_TRAINING, "data": {}}),
           400, "hosting over the WebSocket is not supported"),
    # ---- binary report frames (gridfl extension): 4-byte length, JSON header, diff bytes;
    # report cases above also run as binary frames ("wsbin"), these break the framing
    WSONLY("ws-binary-json-text-as-binary", lambda ctx: b'{"type": "socket-ping"}', 400,
           "binary frame header length 2065855609 is larger than 65536 bytes"),
    WSONLY("ws-binary-truncated-length", lambda ctx: b"\x00\x00\x01", 400,
           "binary frame of 3 bytes is truncated"),
    WSONLY("ws-binary-empty", lambda ctx: b"", 400, "binary frame of 0 bytes is truncated"),
    WSONLY("ws-binary-header-past-end", lambda ctx: (100).to_bytes(4, "big") + b'{"type": 1}',
           400, "binary frame header length 100 runs past the end of the frame (11 bytes"),
    WSONLY("ws-binary-header-not-json", lambda ctx: _bin(b"{not json", _GOOD_STATE), 400,
           "the binary frame's header is not valid JSON"),
    WSONLY("ws-binary-header-not-utf8", lambda ctx: _bin(b'{"type": "\xff"}', _GOOD_STATE), 400,
           "the binary frame's header is not UTF-8"),
    WSONLY("ws-binary-header-utf16", lambda ctx: _bin(
        json.dumps({"type": REPORT, "request_id": "r", "data": _report(ctx, diff=_DROP)}
                   ).encode("utf-16"), _GOOD_STATE), 400, "the binary frame's header is not UTF-8"),
    WSONLY("ws-binary-header-list", lambda ctx: _bin(b"[1]", _GOOD_STATE), 400,
           "expected a JSON object"),
    WSONLY("ws-binary-header-no-type", lambda ctx: _bin_report(ctx, kind=_DROP), 400,
           "message 'type' is required"),
    WSONLY("ws-binary-socket-ping", lambda ctx: _bin_report(ctx, kind=_messages.SOCKET_PING), 400,
           "only 'model-centric/report' and 'model-centric/secure-aggregation'"),
    WSONLY("ws-binary-authenticate", lambda ctx: _bin_report(
        ctx, kind=AUTH, data={"model_name": "mnist"}), 400,
           "only 'model-centric/report' and 'model-centric/secure-aggregation'"),
    WSONLY("ws-binary-diff-in-header", lambda ctx: _bin_report(
        ctx, data=_report(ctx, diff=b64(_GOOD_STATE))), 400, "must not carry 'diff'"),
    WSONLY("ws-binary-no-diff-bytes", lambda ctx: _bin_report(ctx, diff=b""), 400,
           "'diff' must not be empty"),
    WSONLY("ws-binary-missing-worker_id", lambda ctx: _bin_report(
        ctx, data=_report(ctx, worker_id=_DROP, diff=_DROP)), 400, "'worker_id' is required"),
    WSONLY("ws-binary-data-list", lambda ctx: _bin_report(ctx, data=[1]), 400,
           "message 'data' must be an object"),
    WSONLY("ws-binary-oversized", lambda ctx: _bin_report(ctx, diff=b"\0" * MAX_BODY), 0, "",
           ws_close=1009),
    # ---- compressed reports (gridfl extension, gridfl.binary.2 only); the model has 2
    # tensors, 15 values; zip-topk takes at most ceil(0.2 x 15) = 3 values
    ZIP("zip-float16-short", "float16", _f16(*[0.0] * 14) + b"\0", 400,
        "float16 diff is 29 bytes; this model's is 30"),
    ZIP("zip-float16-long", "float16", _f16(*[0.0] * 16), 400,
        "float16 diff is 32 bytes; this model's is 30"),
    ZIP("zip-float16-nan", "float16", _f16(*[0.0] * 14, float("nan")), 400,
        "float16 diff has NaN or infinite values"),
    ZIP("zip-float16-inf", "float16", _f16(float("inf"), *[0.0] * 14), 400,
        "float16 diff has NaN or infinite values"),
    ZIP("zip-int8-short", "int8", _int8([1, 1], np.zeros(14)), 400,
        "int8 diff is 22 bytes; this model's is 23 (2 float32 scales + 15 int8 values)"),
    ZIP("zip-int8-one-scale", "int8", _int8([1]), 400, "int8 diff is 19 bytes"),
    ZIP("zip-int8-scale-nan", "int8", _int8([float("nan"), 1]), 400,
        "tensor 0's scale is nan; it must be finite and >= 0"),
    ZIP("zip-int8-scale-inf", "int8", _int8([1, float("inf")]), 400,
        "tensor 1's scale is inf; it must be finite and >= 0"),
    ZIP("zip-int8-scale-negative", "int8", _int8([-1, 1]), 400,
        "tensor 0's scale is -1.0; it must be finite and >= 0"),
    ZIP("zip-int8-beyond-bound", "int8", _int8([1, 1e11]), 400,
        "int8 diff: tensor 1 dequantizes to 1.27e+13, beyond the diff bound ±1e+12"),
    ZIP("zip-topk-truncated", "topk", b"\1\0", 400, "topk diff is 2 bytes"),
    ZIP("zip-topk-short", "topk", _topk([0, 1], [1, 1])[:-1], 400,
        "topk diff is 19 bytes; this model's is 20"),
    ZIP("zip-topk-count-too-large", "topk", _topk([0, 1, 2, 3], [1, 1, 1, 1]), 400,
        "topk diff: 4 values, more than the 3 this process takes"),
    ZIP("zip-topk-count-huge", "topk", _topk([0], [1], count=2**32 - 1), 400,
        "more than the 3 this process takes"),
    ZIP("zip-topk-index-out-of-range", "topk", _topk([0, 15], [1, 1]), 400,
        "topk diff: index 15 is out of range (the model has 15 values)"),
    ZIP("zip-topk-index-huge", "topk", _topk([2**32 - 1], [1]), 400,
        "index 4294967295 is out of range"),
    ZIP("zip-topk-duplicate-index", "topk", _topk([3, 3], [1, 1]), 400,
        "indices must be strictly increasing (no duplicates)"),
    ZIP("zip-topk-unsorted", "topk", _topk([4, 2], [1, 1]), 400,
        "indices must be strictly increasing"),
    ZIP("zip-topk-value-nan", "topk", _topk([1], [float("nan")]), 400,
        "topk diff has NaN or infinite values"),
    ZIP("zip-topk-value-beyond-bound", "topk", _topk([1, 2], [1, -1e13]), 400,
        "topk diff has values beyond ±1e+12"),
    ZIP("zip-unknown-encoding", "bfloat16", _f16(*[0.0] * 15), 400,
        "'compression' must be 'float16', 'int8' or 'topk'", process="float16"),
    ZIP("zip-other-encoding-than-asked", "int8", _int8([1, 1]), 400,
        "this process takes 'topk'-compressed reports, not 'int8'", process="topk"),
    ZIP("zip-on-process-without-compression", "float16", _f16(*[0.0] * 15), 400,
        "this process takes no compressed reports", process="mnist"),
    ZIP("zip-without-subprotocol", "float16", _f16(*[0.0] * 15), 400,
        "a compressed report needs a socket that negotiated the 'gridfl.binary.2'",
        transports=("ws",)),
    W("report-compressed-as-json", REPORT, lambda ctx: _report(ctx, compression="float16"),
      400, "a compressed diff travels only in a binary report frame"),
    # ---- downloads: HTTP GET, and over a gridfl.binary.2 socket ("wsdl")
    DL("get-model-missing-params", "get-model", 400, "'model_id' is required",
       worker_id=_DROP, request_key=_DROP, model_id=_DROP),
    DL("get-model-id-not-int", "get-model", 400, "'model_id' must be an integer",
       model_id="one"),
    DL("get-model-id-huge", "get-model", 400, "Model ID not found!", model_id="9" * 30),
    DL("get-model-unknown-id", "get-model", 400, "Model ID not found!", model_id=987654),
    DL("get-model-wrong-key", "get-model", 401, "Invalid request key!", request_key="f" * 64),
    DL("get-model-missing-key", "get-model", 400, "'request_key' is required",
       request_key=_DROP),
    DL("get-model-unknown-worker", "get-model", 400, "Worker ID not found!", worker_id="w"),
    DL("get-model-of-B-with-A-key", "get-model", 401, "Invalid request key!",
       model_id=lambda ctx: ctx.other_model_id),
    DL("get-plan-unknown-variant", "get-plan", 400, "'receive_operations_as' must be one of",
       receive_operations_as="pickle"),
    DL("get-plan-variant-not-hosted", "get-plan", 400, "has no 'tfjs' variant; it has: onnx",
       receive_operations_as="tfjs"),
    DL("get-plan-unknown-id", "get-plan", 400, "Plan ID not found!", plan_id=987654),
    DL("get-protocol-unknown-id", "get-protocol", 400, "Protocol ID not found!",
       protocol_id=987654),
    DL("ws-get-model-max_bytes-string", "get-model", 400,
       "'max_bytes' must be a non-negative integer", transports=("wsdl",), max_bytes="10"),
    DL("ws-get-model-max_bytes-negative", "get-model", 400,
       "'max_bytes' must be a non-negative integer", transports=("wsdl",), max_bytes=-1),
    DL("ws-get-model-over-max_bytes", "get-model", 413,
       "more than the 1 bytes this socket takes", transports=("wsdl",), max_bytes=1),
    DL("ws-get-model-without-subprotocol", "get-model", 400,
       "unknown message type 'model-centric/get-model'", transports=("ws",)),
    H("speed-test-missing-worker", lambda ctx: {"method": "GET",
      "url": "/model-centric/speed-test"}, 400, "'worker_id' is required"),
    H("speed-test-unknown-worker", lambda ctx: {"method": "POST",
      "url": "/model-centric/speed-test", "params": {"worker_id": "x"}, "content": b"x" * 100},
      400, "Worker ID not found!"),
    # ---- routing
    H("unknown-path", lambda ctx: {"method": "GET", "url": "/model-centric/nope"}, 404,
      "not found"),
    H("wrong-method", lambda ctx: {"method": "GET", "url": "/" + REPORT}, 405,
      "method not allowed"),
    # ---- admin: tokens
    H("host-without-admin-token", _host(lambda p, c: None, token=None), 401,
      "admin token required"),
    H("host-with-wrong-admin-token", _host(lambda p, c: None, token="wrong"), 401,
      "invalid admin token"),
    H("host-basic-auth", _admin_req("POST", "/gridfl/v1/processes", token=None,
      headers={"Authorization": "Basic YWRtaW46YWRtaW4="}, json={}), 401,
      "admin token required"),
    H("status-with-wrong-admin-token", _admin_req("GET", "/gridfl/v1/processes", token="x"),
      401, "invalid admin token"),
    H("retrieve-model-without-token", lambda ctx: {"method": "GET",
      "url": "/model-centric/retrieve-model", "params": {"name": "mnist"}}, 401,
      "admin token required"),
    H("checkpoint-without-token", lambda ctx: {"method": "GET",
      "url": "/gridfl/v1/processes/mnist/1.0/checkpoints/latest"}, 401, "admin token required"),
    H("delete-with-wrong-token", _admin_req("DELETE", "/gridfl/v1/processes/mnist/1.0",
      token="x"), 401, "invalid admin token"),
    H("stop-without-token", _admin_req("POST", "/gridfl/v1/processes/mnist/1.0/stop",
      token=None), 401, "admin token required"),
    H("host-on-node-without-admin-token", lambda ctx: {"method": "POST",
      "url": ctx.bare.url + "/gridfl/v1/processes", "headers": {"Authorization": "Bearer x"},
      "json": host_payload(name="fresh")}, 403, "the admin API is disabled"),
    # ---- admin: hosting payloads
    H("host-malformed-json", _host(None, raw=b'{"client_config": '), 400, "not valid JSON"),
    H("host-not-an-object", _host(None, raw=b'[{"client_config": {}}]'), 400,
      "host: expected a JSON object"),
    H("host-unknown-top-level-key", _host(_set("model_bytes", "AAAA")), 400,
      "host: unknown fields ['model_bytes']"),
    H("host-oversized-body", _host(None, raw=b"{" + b" " * MAX_ADMIN_BODY + b"}"), 413,
      "larger than the node accepts"),
    H("host-duplicate", _host(lambda p, c: p["client_config"].update(name="mnist")), 409,
      "FL Process already exists: 'mnist' version '1.0'"),
    H("host-client_config-missing", _host(_set("client_config", _DROP)), 400,
      "client_config must be an object"),
    H("host-client_config-no-name", _host(lambda p, c: p["client_config"].pop("name")), 400,
      "client_config.name is required"),
    H("host-client_config-name-nul", _host(lambda p, c: p["client_config"].update(name="a\0")),
      400, "control character"),
    H("host-client_config-NaN", _host(None, raw=_host_json(decay="NaN")), 400,
      "'client_config.decay' is not a finite number"),
    H("host-client_config-1e999", _host(None, raw=_host_json(decay="[0.1, 1e999]")), 400,
      "'client_config.decay[1]' is not a finite number"),
    H("host-client_config-surrogate-key", _host(None, raw=_host_json(**{"\\udc00": "1"})), 400,
      "is not valid Unicode"),
    H("host-cycle_length-1e-9", _host(_sc(cycle_length=1e-9)), 400,
      "server_config.cycle_length must be a number >= 1"),
    H("host-unknown-server_config-key", _host(_sc(cycle_lenght=60)), 400,
      "server_config: unknown keys ['cycle_lenght']"),
    H("host-server_config-not-object", _host(_set("server_config", [1])), 400,
      "server_config must be an object"),
    H("host-cycle_length-string", _host(_sc(cycle_length="60")), 400,
      "server_config.cycle_length must be a number >= 1"),
    H("host-cycle_length-zero", _host(_sc(cycle_length=0)), 400,
      "server_config.cycle_length must be a number >= 1"),
    H("host-cycle_length-huge-int", _host(_sc(cycle_length=10**400)), 400,
      "'server_config.cycle_length' is an integer beyond the float range"),
    H("host-num_cycles-bool", _host(_sc(num_cycles=True)), 400,
      "server_config.num_cycles must be an integer >= 0"),
    H("host-max_workers-zero", _host(_sc(max_workers=0)), 400,
      "server_config.max_workers must be an integer >= 1"),
    H("host-max_workers-huge", _host(_sc(max_workers=10**400)), 400,
      "'server_config.max_workers' is an integer beyond the float range"),
    H("host-over_selection-huge", _host(_sc(max_workers=2, over_selection=1e300)), 400,
      "server_config.over_selection must be"),
    H("host-compression-unknown-kind", _host(_sc(compression={"kind": "zip"})), 400,
      "server_config.compression must be null or an object"),
    H("host-compression-string", _host(_sc(compression="int8")), 400,
      "server_config.compression must be null or an object"),
    H("host-compression-fraction-zero", _host(_sc(compression={"kind": "topk", "fraction": 0})),
      400, "server_config.compression.fraction must be a number in (0, 1]"),
    H("host-compression-fraction-on-int8",
      _host(_sc(compression={"kind": "int8", "fraction": 0.1})), 400,
      "unknown keys ['fraction'] for kind 'int8'"),
    H("host-compression-integer-model", _host(lambda p, c: p.update(
      model=b64(state.dumps([np.ones(3, np.int32)])),
      server_config={"compression": {"kind": "float16"}})), 400,
      "server_config.compression needs a model of float tensors only; this one has int32"),
    H("host-pace_steering-text", _host(_sc(pace_steering="yes")), 400,
      "server_config.pace_steering must be"),
    H("host-durability-unknown", _host(_sc(durability="weekly")), 400,
      "server_config.durability must be 'report' (every accepted report survives a crash) "
      "or 'cycle'"),
    H("host-durability-cycle-async",
      _host(_sc(durability="cycle", mode="async", cycle_length=None, min_diffs=None,
                max_diffs=None, min_workers=None, max_workers=None)), 400,
      "server_config.durability 'cycle' is not available with mode 'async' yet"),
    H("host-durability-cycle-robust",
      _host(_sc(durability="cycle", strategy={"name": "fedmedian"})), 400,
      "server_config.durability 'cycle' is not available with strategy 'fedmedian' yet"),
    H("host-pace_steering-zero-window", _host(_sc(pace_steering={"window": 0})), 400,
      "server_config.pace_steering.window must be a number >= 1.0"),
    H("host-pace_steering-unknown-key", _host(_sc(pace_steering={"window": 5, "rate": 1})),
      400, "server_config.pace_steering must be"),
    H("host-max_diffs-below-min_diffs", _host(_sc(min_diffs=3, max_diffs=2)), 400,
      "max_diffs must be >= min_diffs"),
    H("host-pool_selection-unknown", _host(_sc(pool_selection="best")), 400,
      "pool_selection must be 'random' or 'iterate'"),
    H("host-iterative_plan-string", _host(_sc(iterative_plan="yes")), 400,
      "iterative_plan must be true or false"),
    H("host-auth-unknown-key", _host(_sc(authentication={"secrets": "x"})), 400,
      "authentication: unknown keys ['secrets']"),
    H("host-auth-pem-as-secret", _host(lambda p, c: p["server_config"].update(
      authentication={"secret": c.public})), 400, "looks like a PEM key"),
    H("host-auth-pub_key-not-rsa", _host(_sc(authentication={"pub_key": "not a key"})), 400,
      "pub_key is not an RSA key"),
    H("host-auth-endpoint-not-http", _host(_sc(authentication={"endpoint": "file:///etc"})),
      400, "endpoint must be an http(s) URL"),
    H("host-strategy-unknown-name", _host(_sc(strategy={"name": "fedsgd"})), 400,
      "server_config.strategy.name must be one of"),
    H("host-strategy-not-object", _host(_sc(strategy="fedadam")), 400,
      "server_config.strategy must be an object"),
    H("host-strategy-negative-eta", _host(_sc(strategy={"name": "fedadam", "eta": -0.1})), 400,
      "server_config.strategy.eta must be a number > 0"),
    H("host-strategy-beta_1-one", _host(_sc(strategy={"name": "fedyogi", "beta_1": 1})), 400,
      "server_config.strategy.beta_1 must be a number in [0, 1)"),
    H("host-strategy-unknown-hyperparameter",
      _host(_sc(strategy={"name": "fedadam", "eta_l": 0.1})), 400, "fedadam has no ['eta_l']"),
    H("host-strategy-clip_norm-negative", _host(_sc(strategy={"name": "fedavg",
      "clip_norm": -1})), 400, "server_config.strategy.clip_norm must be a number > 0"),
    H("host-strategy-trim-half", _host(_sc(max_diffs=10, strategy={"name": "fedtrimmedavg",
      "beta": 0.5})), 400, "server_config.strategy.beta must be a number in [0, 0.5)"),
    H("host-strategy-krum-f-too-large", _host(_sc(max_diffs=6, strategy={"name": "krum",
      "num_malicious_nodes": 2})), 400, "needs max_diffs >= 7 (n > 2f + 2); max_diffs is 6"),
    H("host-strategy-robust-without-max_diffs",
      _host(_sc(max_diffs=None, strategy={"name": "fedmedian"})), 400,
      "set server_config.max_diffs"),
    H("host-strategy-with-averaging-plan",
      _host(lambda p, c: p.update(averaging_plan=b64(averaging_plan()), server_config={
          "iterative_plan": True, "strategy": {"name": "fedadam"}})), 400,
      "a hosted averaging_plan is the aggregation rule"),
    H("host-fedprox-plan-without-global-params",
      _host(_sc(strategy={"name": "fedprox", "proximal_mu": 0.1})), 400,
      "fedprox needs training plans with global_param inputs"),
    H("host-fedprox-negative-mu", _host(_sc(strategy={"name": "fedprox", "proximal_mu": -0.1})),
      400, "server_config.strategy.proximal_mu must be a number >= 0"),
    H("host-fedprox-without-mu", _host(_sc(strategy={"name": "fedprox"})), 400,
      "fedprox needs proximal_mu"),
    H("host-fedprox-with-syftjs-variant", _host(lambda p, c: p.update(
        plans={"training_plan": {"onnx": b64(proximal_training_plan()), "list": b64(b"x")}},
        server_config={"strategy": {"name": "fedprox", "proximal_mu": 0.1}})), 400,
      "syft.js runs those variants, which have no proximal term"),
    H("host-fedprox-with-averaging-plan",
      _host(lambda p, c: p.update(averaging_plan=b64(averaging_plan()),
          plans={"training_plan": b64(proximal_training_plan())}, server_config={
          "iterative_plan": True, "strategy": {"name": "fedprox", "proximal_mu": 0.1}})), 400,
      "a hosted averaging_plan is the aggregation rule"),
    H("host-proximal-plan-without-fedprox", _host(lambda p, c: p.update(
        plans={"training_plan": b64(proximal_training_plan())})), 400,
      "takes FedProx global params (compiled with proximal_mu)"),
    H("host-fedprox-client_config-mu-differs", _host(lambda p, c: (
        p.update(plans={"training_plan": b64(proximal_training_plan())}),
        p["server_config"].update(strategy={"name": "fedprox", "proximal_mu": 0.1}),
        p["client_config"].update(proximal_mu=0.5))), 400,
      "client_config.proximal_mu is 0.5 but server_config.strategy.proximal_mu is 0.1"),
    H("host-model-missing", _host(_set("model", _DROP)), 400,
      "model: expected a non-empty base64 string"),
    H("host-model-not-base64", _host(_set("model", "%%%")), 400, "model: not valid base64"),
    H("host-model-garbage-state", _host(_set("model", b64(b"\x07garbage"))), 400,
      "model: not valid State bytes"),
    H("host-model-hostile-state", _host(_set("model", b64(_hostile_huge_length()))), 400,
      "model: not valid State bytes"),
    H("host-model-no-tensors", _host(_set("model", b64(pw.len_field(1, b"")))), 400,
      "the State holds no tensors"),
    H("host-plans-missing", _host(_set("plans", _DROP)), 400, "plans: expected an object"),
    H("host-plans-empty", _host(_set("plans", {})), 400, "plans: expected an object"),
    H("host-plan-invalid-bytes", _host(_set("plans", {"training_plan": b64(b"not onnx")})), 400,
      "plans.training_plan: not a loadable plan"),
    H("host-plan-is-a-state", _host(_set("plans", {"training_plan": b64(_GOOD_STATE)})), 400,
      "plans.training_plan: not a loadable plan"),
    H("host-plan-not-base64", _host(_set("plans", {"training_plan": "!!"})), 400,
      "plans.training_plan.onnx: not valid base64"),
    H("host-plan-unknown-variant", _host(_set("plans", {"training_plan": {"pickle": "AAAA"}})),
      400, "plans.training_plan: unknown variant 'pickle'"),
    H("host-plan-averaging-kind", _host(_set("plans", {"training_plan": b64(averaging_plan())})),
      400, "kind is 'averaging'"),
    H("host-plan-shape-mismatch",
      _host(_set("plans", {"training_plan": b64(training_plan([(3, 4), (3,)]))})), 400,
      "has shape [3, 4]; model tensor 0 is float32[4, 3]"),
    H("host-plan-too-many-params",
      _host(_set("plans", {"training_plan": b64(training_plan([*SHAPES, (2,)]))})), 400,
      "is model_param 2; the model has 2 tensors"),
    H("host-averaging-plan-not-iterative", _host(_set("averaging_plan", b64(averaging_plan()))),
      400, "an averaging_plan needs server_config.iterative_plan = true"),
    H("host-averaging-plan-is-training",
      _host(lambda p, c: p.update(averaging_plan=b64(training_plan()),
                                  server_config={"iterative_plan": True})),
      400, "averaging_plan: kind is 'training'"),
    H("host-averaging-plan-garbage", _host(_set("averaging_plan", b64(b"\x00" * 10))), 400,
      "averaging_plan: not a loadable plan"),
    H("host-protocols-not-object", _host(_set("protocols", ["x"])), 400,
      "protocols: expected an object"),
    H("host-protocol-not-base64", _host(_set("protocols", {"p": 1})), 400,
      "protocols.p: expected a non-empty base64 string"),
    # NUL in a name: PostgreSQL refuses to store it (a 500 before); refused on both stores
    H("host-plan-name-nul", _host(_set("plans", {"train\x00ing": b64(training_plan())})), 400,
      "the key 'plans.train\\x00ing' must not contain control character NUL"),
    H("host-protocol-name-nul", _host(_set("protocols", {"p\x00": b64(b"x")})), 400,
      "the key 'protocols.p\\x00' must not contain control character NUL"),
    # ---- admin: unknown processes, checkpoints, retrieve
    H("status-unknown-process", _admin_req("GET", "/gridfl/v1/processes/nope"), 404,
      "no FL process named 'nope'"),
    H("status-unknown-version", _admin_req("GET", "/gridfl/v1/processes/mnist/9.9"), 404,
      "no FL process named 'mnist' version '9.9'"),
    H("checkpoint-unknown-number",
      _admin_req("GET", "/gridfl/v1/processes/mnist/1.0/checkpoints/99"), 404,
      "has no checkpoint '99'"),
    H("checkpoint-huge-number",
      _admin_req("GET", "/gridfl/v1/processes/mnist/1.0/checkpoints/" + "9" * 30), 404,
      "has no checkpoint"),
    H("checkpoint-unicode-digit",
      _admin_req("GET", "/gridfl/v1/processes/mnist/1.0/checkpoints/%C2%B2"), 404,
      "has no checkpoint"),
    H("checkpoint-unknown-alias",
      _admin_req("GET", "/gridfl/v1/processes/mnist/1.0/checkpoints/best"), 404,
      "has no checkpoint 'best'"),
    H("retrieve-model-missing-name", _admin_req("GET", "/model-centric/retrieve-model"), 400,
      "'name' is required"),
    H("retrieve-model-unknown", _admin_req("GET", "/model-centric/retrieve-model",
      params={"name": "nope"}), 404, "no FL process named 'nope'"),
    H("stop-unknown-process", _admin_req("POST", "/gridfl/v1/processes/nope/1.0/stop"), 404,
      "no FL process named 'nope'"),
    H("delete-unknown-process", _admin_req("DELETE", "/gridfl/v1/processes/nope/1.0"), 404,
      "no FL process named 'nope'"),
]
# fmt: on

def _transports(case: Case) -> tuple[str, ...]:
    """The case's transports, plus "wsbin" (the report as a binary WebSocket frame) for
    report cases that go over the WebSocket with a JSON ``data``."""
    binary = (case.kind == REPORT and case.data is not None and "ws" in case.transports
              and case.id not in _NOT_BINARY)
    return (*case.transports, "wsbin") if binary else case.transports


_PARAMS = [
    pytest.param(case, transport, id=f"{case.id}[{transport}]")
    for case in CASES
    for transport in _transports(case)
]


def _send_http(ctx, case: Case) -> httpx.Response:
    if case.request is not None:
        kw = case.request(ctx)
        url = kw.pop("url")
        if url.startswith("http"):
            with httpx.Client(timeout=30) as c:
                return c.request(url=url, **kw)
        return ctx.http.request(url=url, **kw)
    body = case.raw(ctx) if case.raw is not None else json.dumps(case.data(ctx))
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    return ctx.http.post(
        "/" + case.kind, content=body, headers={"content-type": "application/json"}
    )


def _send_ws(ctx, case: Case, transport: str = "ws") -> tuple[dict | None, int | None]:
    """(reply, close code): the node's reply frame, or the code it closed the socket with;
    "wsbin": the report as a binary frame (gridfl extension) instead of JSON text; "wsdl"
    and download cases: the GET's query as a request frame's ``data``, on a socket that
    negotiated gridfl.binary.2 ("wsdl") or none ("ws")."""
    from websockets.exceptions import ConnectionClosed

    rid = uuid.uuid4().hex
    subprotocols = [_messages.BINARY_SUBPROTOCOL] if transport in ("wsdl", "wsz") else None
    if case.request is not None:  # a download
        params = case.request(ctx).get("params", {})
        frame = json.dumps({"type": case.kind, "request_id": rid, "data": params})
    elif transport == "wsbin":
        data = dict(case.data(ctx))
        diff = _messages.b64decode(data.pop("diff"))  # every "wsbin" case has a base64 diff
        frame = _messages.encode_binary_report({**data, "diff": diff}, rid)
    elif case.raw is not None:
        frame = case.raw(ctx)
        if case.kind not in ("?", None) and not isinstance(frame, bytes):
            try:
                data = json.loads(frame)
            except (ValueError, RecursionError):
                pass  # malformed on purpose: sent as is
            else:
                frame = json.dumps({"type": case.kind, "request_id": rid, "data": data})
    else:
        frame = json.dumps({"type": case.kind, "request_id": rid, "data": case.data(ctx)})
    with connect(ctx.srv.ws_url, max_size=None, open_timeout=20, subprotocols=subprotocols) as ws:
        try:
            ws.send(frame)
            reply = _strict_json(ws.recv(timeout=30))
        except ConnectionClosed as e:
            return None, e.rcvd.code if e.rcvd else None
        # the socket stays usable after an error
        ws.send(json.dumps({"type": _messages.SOCKET_PING, "request_id": "after"}))
        pong = json.loads(ws.recv(timeout=30))
        assert pong == {"alive": "True", "request_id": "after"}, pong
    if isinstance(reply, dict) and reply.get("request_id") not in (None, rid, "r"):
        raise AssertionError(f"reply to another request: {reply}")
    return reply, None


def _refuse_constant(name: str):
    raise AssertionError(f"the node sent {name}, which is not JSON")


def _strict_json(text: str | bytes) -> Any:
    return json.loads(text, parse_constant=_refuse_constant)


def _check_message(message: str, case: Case) -> None:
    assert isinstance(message, str) and message, message
    assert case.message.lower() in message.lower(), (case.message, message)
    assert "internal server error" not in message.lower()


@pytest.mark.parametrize(("case", "transport"), _PARAMS)
def test_bad_input(node, case: Case, transport: str):
    before = snapshot(node)
    if transport == "http":
        r = _send_http(node, case)
        assert r.status_code == case.status, (r.status_code, r.text[:500])
        assert r.headers["content-type"].startswith("application/json"), r.headers
        body = _strict_json(r.content)
        _check_message(body.get("error"), case)
        if case.kind == CYCLE:
            assert body.get("status") == "rejected", body
    else:
        reply, closed = _send_ws(node, case, transport)
        if case.ws_close is not None:
            assert closed == case.ws_close, (closed, reply)
        else:
            assert closed is None, f"the socket closed ({closed}) instead of replying"
            # a frame without a usable type gets a bare {error, status_code} (no envelope)
            data = reply["data"] if "type" in reply else reply
            assert data.get("status_code") == case.status, data
            _check_message(data.get("error"), case)
            if case.kind not in ("?", None) and case.raw is None:
                assert reply.get("type") == case.kind, reply
            if case.kind == CYCLE and "type" in reply:
                assert data.get("status") == "rejected", data
    after = snapshot(node)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the node changed: {changed}"


def test_the_snapshot_sees_a_valid_report(node):
    """Control (runs after the matrix): the snapshot would catch a change, a good report
    through the same path is accepted."""
    before = snapshot(node)
    r = node.http.post("/" + REPORT, json=_report(node))
    assert r.status_code == 200, r.text
    after = snapshot(node)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {"status:mnist", "table:worker_cycles", "table:aggregates"} <= changed, changed


def test_the_snapshot_sees_a_valid_compressed_report(node):
    """Control for the compressed cases: a well-formed int8 report through the same path
    (a gridfl.binary.2 socket) is taken and changes the aggregate."""
    before = snapshot(node)
    wid, key = node.zipped["int8"]
    data = {"worker_id": wid, "request_key": key, "compression": "int8"}
    frame = _bin(json.dumps({"type": REPORT, "request_id": "r", "data": data}).encode(),
                 _int8([0.01, 0.02]))
    with connect(node.srv.ws_url, subprotocols=[_messages.BINARY_SUBPROTOCOL]) as ws:
        ws.send(frame)
        reply = json.loads(ws.recv(timeout=30))
    assert reply["data"] == {"status": "success"}, reply
    after = snapshot(node)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {"table:worker_cycles", "table:aggregates"} <= changed, changed
