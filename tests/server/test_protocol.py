"""The syft.js / PyGrid integration scenarios (reference §7.4) as server contract tests,
over both WebSocket and HTTP, against a live uvicorn server on loopback."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest

from gridfl import _messages, state
from gridfl.plan import Plan
from tests.builders import b64, diff_of, host_payload, rsa_key_pair, training_plan
from tests.harness import Admin, HttpWorker, WsWorker, join, report

AUTH = "model-centric/authenticate"
CYCLE = "model-centric/cycle-request"
SECRET = "a-long-enough-hs256-secret-for-the-tests"


def _host(admin, name="mnist", **cfg):
    r = admin.host(host_payload(name=name, server_config=cfg))
    assert r.status_code == 201, r.text
    return r.json()


def _auth(worker, token=None, name="mnist", version=None):
    data = {"model_name": name}
    if version:
        data["model_version"] = version
    if token is not None:
        data["auth_token"] = token
    return worker.call(AUTH, data)


def test_auth_flow_success_no_auth(admin, worker_factory):
    _host(admin)
    st, body = _auth(worker_factory())
    assert st == 200
    assert body["status"] == "success" and body["requires_speed_test"] is False
    assert len(body["worker_id"]) == 36


def test_auth_required_and_invalid_texts(admin, worker_factory):
    _host(admin, authentication={"secret": SECRET})
    w = worker_factory()
    st, body = _auth(w)
    assert st == 400 and body["error"] == _messages.MSG_AUTH_REQUIRED
    st, body = _auth(w, token="garbage")
    assert st == 400 and "The 'auth_token' you sent is invalid" in body["error"]
    good = jwt.encode({}, SECRET, algorithm="HS256")
    assert _auth(w, token=good)[0] == 200


@pytest.mark.parametrize("transport", ["http"])
def test_jwt_cases(admin, worker_factory, rsa_keys):
    private, public = rsa_keys
    _host(admin, authentication={"type": "jwt", "pub_key": public})
    w = worker_factory()
    now = int(time.time())
    ok = jwt.encode({"sub": "alice"}, private, algorithm="RS256")
    assert _auth(w, token=ok)[0] == 200
    bad = {
        "expired": jwt.encode({"exp": now - 10}, private, algorithm="RS256"),
        "alg none": jwt.encode({}, None, algorithm="none"),
        "hs256 with the public key": _hs256_forged(public),
        "other key": jwt.encode({}, _other_private(), algorithm="RS256"),
    }
    for what, token in bad.items():
        st, body = _auth(w, token=token)
        assert st == 400 and body["error"] == _messages.MSG_AUTH_INVALID, what


def _hs256_forged(public: str) -> str:
    """The classic confusion attack: HS256 'signed' with the RSA public key as secret."""
    import base64
    import hashlib
    import hmac

    def enc(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = enc(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = enc(b"{}")
    sig = hmac.new(public.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{enc(sig)}"


def _other_private() -> str:
    return rsa_key_pair()[0]


def test_per_job_auth(admin, worker_factory):
    _host(admin, name="open")
    _host(admin, name="closed", authentication={"secret": SECRET})
    w = worker_factory()
    assert _auth(w, name="open")[0] == 200
    st, body = _auth(w, name="closed", token="not-it")
    assert st == 400 and "invalid" in body["error"]


def test_worker_id_bound_to_process_pg628(admin, worker_factory):
    """A worker_id from an open model must not join a protected one."""
    _host(admin, name="open")
    _host(admin, name="closed", authentication={"secret": SECRET})
    w = worker_factory()
    _, body = _auth(w, name="open", version="1.0")
    st, cyc = w.call(CYCLE, {"worker_id": body["worker_id"], "model": "closed", "version": "1.0"})
    assert st in (400, 403) and cyc["status"] == "rejected" and "authenticate" in cyc["error"]


def test_third_party_endpoint(admin, worker_factory):
    import http.server

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200 if body.get("auth_token") == "letmein" else 403)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/check"
        _host(admin, authentication={"endpoint": url})
        w = worker_factory()
        assert _auth(w, token="letmein")[0] == 200
        st, body = _auth(w, token="nope")
        assert st == 400 and body["error"] == _messages.MSG_AUTH_THIRD_PARTY
    finally:
        srv.shutdown()


def test_acceptance_without_auth(admin, worker_factory):
    hosted = _host(admin)
    w = worker_factory()
    wid, cyc = join(w, version=None)
    assert cyc["status"] == "accepted"
    assert len(cyc["request_key"]) == 64
    assert cyc["model"] == "mnist" and cyc["version"] == "1.0"
    assert cyc["model_id"] == hosted["model_id"]
    assert cyc["plans"] == hosted["plans"] and cyc["protocols"] == {}
    assert cyc["client_config"] == host_payload()["client_config"]
    # gridfl extension: the digest of each plan's onnx variant, as downloaded
    onnx = w.get("get-plan", worker_id=wid, request_key=cyc["request_key"],
                 plan_id=cyc["plans"]["training_plan"]).content
    assert cyc["plan_digests"] == {"training_plan": hashlib.sha256(onnx).hexdigest()}


def test_plan_digests_name_only_plans_with_an_onnx_variant(admin, worker_factory):
    payload = host_payload(plans={"training_plan": {"tfjs": b64(b"TFJS")},
                                  "eval_plan": b64(training_plan())})
    assert admin.host(payload).status_code == 201
    _, cyc = join(worker_factory())
    assert set(cyc["plans"]) == {"training_plan", "eval_plan"}
    assert set(cyc["plan_digests"]) == {"eval_plan"}


def test_rejection_with_integer_timeout_and_reason(admin, worker_factory):
    _host(admin, max_workers=1, max_diffs=1, cycle_length=300)
    w = worker_factory()
    assert join(w)[1]["status"] == "accepted"
    _, cyc = join(w)
    assert cyc["status"] == "rejected"
    assert isinstance(cyc["timeout"], int) and 290 <= cyc["timeout"] <= 300
    assert cyc["reason"]


def test_full_flow_with_diff_report(admin, worker_factory):
    _host(admin, max_diffs=1)
    w = worker_factory()
    wid, cyc = join(w)
    key = cyc["request_key"]
    model = w.get("get-model", worker_id=wid, request_key=key, model_id=cyc["model_id"])
    assert model.status_code == 200 and len(state.loads(model.content)) == 2
    plan = w.get(
        "get-plan", worker_id=wid, request_key=key, plan_id=cyc["plans"]["training_plan"]
    )  # default variant: onnx
    assert Plan.from_bytes(plan.content).kind == "training"
    assert report(w, wid, key, diff_of(0)) == (200, {"status": "success"})
    # the cycle closed: its keys no longer download (the next cycle has other keys)
    r = w.get("get-model", worker_id=wid, request_key=key, model_id=cyc["model_id"])
    assert (r.status_code, r.json()) == (401, {"error": "Invalid request key!"})


def test_missing_fl_model(admin, worker_factory):
    _host(admin)
    w = worker_factory()
    st, body = _auth(w, name="nope")
    assert st == (404 if w.transport == "http" else 400) and "nope" in body["error"]
    _, auth = _auth(w)
    st, cyc = w.call(CYCLE, {"worker_id": auth["worker_id"], "model": "nope"})
    assert st >= 400 and cyc["status"] == "rejected" and cyc["error"]
    st, cyc = w.call(CYCLE, {"worker_id": "unknown", "model": "mnist"})
    assert st == 400 and cyc["error"] == _messages.MSG_WORKER_NOT_FOUND


def test_missing_model_plan_and_bad_key(admin, worker_factory):
    _host(admin)
    w = worker_factory()
    wid, cyc = join(w)
    key = cyc["request_key"]
    r = w.get("get-model", worker_id=wid, request_key=key, model_id=999)
    assert (r.status_code, r.json()) == (400, {"error": "Model ID not found!"})
    r = w.get("get-plan", worker_id=wid, request_key=key, plan_id=999)
    assert (r.status_code, r.json()) == (400, {"error": "Plan ID not found!"})
    r = w.get("get-model", worker_id=wid, request_key="0" * 64, model_id=cyc["model_id"])
    assert (r.status_code, r.json()) == (401, {"error": "Invalid request key!"})
    r = w.get(
        "get-plan",
        worker_id=wid,
        request_key=key,
        plan_id=cyc["plans"]["training_plan"],
        receive_operations_as="tfjs",
    )
    assert r.status_code == 400 and "no 'tfjs' variant" in r.json()["error"]
    r = w.get(
        "get-plan",
        worker_id=wid,
        request_key=key,
        plan_id=cyc["plans"]["training_plan"],
        receive_operations_as="pickle",
    )
    assert r.status_code == 400
    r = w.get("get-model", worker_id=wid, request_key=key)
    assert r.status_code == 400 and "model_id" in r.json()["error"]


def test_plan_variants_and_protocol(admin, worker_factory):
    payload = host_payload(
        plans={"training_plan": {"onnx": b64(training_plan()), "tfjs": b64(b"TFJS")}},
        protocols={"secure_agg": b"PROTO"},
    )
    assert admin.host(payload).status_code == 201
    w = worker_factory()
    wid, cyc = join(w)
    key, pid = cyc["request_key"], cyc["plans"]["training_plan"]
    assert (
        w.get(
            "get-plan", worker_id=wid, request_key=key, plan_id=pid, receive_operations_as="tfjs"
        ).content
        == b"TFJS"
    )
    assert w.get("get-plan", worker_id=wid, request_key=key, plan_id=pid).content[:2] != b"TF"
    proto = cyc["protocols"]["secure_agg"]
    r = w.get("get-protocol", worker_id=wid, request_key=key, protocol_id=proto)
    assert r.status_code == 200 and r.content == b"PROTO"


def test_multiple_jobs_one_socket(server, admin):
    _host(admin, name="a")
    _host(admin, name="b")
    w = WsWorker(server.url, server.ws_url)
    try:
        ids = [uuid for uuid in ("r1", "r2", "r3", "r4")]
        frames = [
            {"type": AUTH, "request_id": rid, "data": {"model_name": m}}
            for rid, m in zip(ids, ["a", "b", "a", "b"], strict=True)
        ]
        for f in frames:  # all in flight at once over one socket
            w.ws.send(json.dumps(f))
        replies = [json.loads(w.ws.recv(timeout=20)) for _ in frames]
        assert sorted(r["request_id"] for r in replies) == ids
        assert all(r["data"]["status"] == "success" for r in replies)
        w.ws.send(json.dumps({"type": "socket-ping", "request_id": "p", "data": {}}))
        assert json.loads(w.ws.recv(timeout=20)) == {"alive": "True", "request_id": "p"}
        w.ws.send(json.dumps({"type": "nope", "request_id": "x", "data": {}}))
        reply = json.loads(w.ws.recv(timeout=20))
        assert reply["request_id"] == "x" and "unknown message type" in reply["data"]["error"]
        assert reply["data"]["status_code"] == 400
        w.ws.send("{not json")
        assert "not valid JSON" in json.loads(w.ws.recv(timeout=20))["error"]
    finally:
        w.close()


def test_speed_test_required(admin, worker_factory, server):
    _host(admin, minimum_download_speed=10, minimum_upload_speed=5)
    w = worker_factory()
    st, auth = _auth(w)
    assert auth["requires_speed_test"] is True
    wid = auth["worker_id"]
    st, cyc = w.call(CYCLE, {"worker_id": wid, "model": "mnist"})
    assert st == 400 and cyc["status"] == "rejected" and "'ping' is required" in cyc["error"]
    st, cyc = w.call(
        CYCLE, {"worker_id": wid, "model": "mnist", "ping": 5, "download": 1, "upload": 100}
    )
    assert cyc["status"] == "rejected" and "download speed" in cyc["reason"]
    st, cyc = w.call(
        CYCLE, {"worker_id": wid, "model": "mnist", "ping": -1, "download": 1, "upload": 100}
    )
    assert st == 400 and "positive number" in cyc["error"]
    _, auth = _auth(w)
    st, cyc = w.call(
        CYCLE,
        {"worker_id": auth["worker_id"], "model": "mnist", "ping": 5, "download": 50, "upload": 50},
    )
    assert cyc["status"] == "accepted"
    # the speed test endpoints themselves
    r = w.get("speed-test", worker_id=wid, random="0.5", is_ping=1)
    assert (r.status_code, r.json()) == (200, {})
    r = w.get("speed-test", worker_id=wid, random="0.5")
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/form-data")
    assert len(r.content) > server.settings.speed_test_bytes
    r = w.http.post("/model-centric/speed-test", params={"worker_id": wid}, content=b"y" * 100000)
    assert (r.status_code, r.json()) == (200, {})
    assert w.get("speed-test", random="1").status_code == 400
    assert w.get("speed-test", worker_id="nobody").status_code == 400


def test_concurrent_reports_complete_exactly_once(admin, server, transport):
    """max_diffs reached by several simultaneous reports: one completion, one checkpoint."""
    _host(admin, max_diffs=3, num_cycles=0)
    workers = [
        HttpWorker(server.url) if transport == "http" else WsWorker(server.url, server.ws_url)
        for _ in range(8)
    ]
    joined = [join(w) for w in workers]
    with ThreadPoolExecutor(8) as ex:
        results = list(
            ex.map(
                lambda i: report(workers[i], joined[i][0], joined[i][1]["request_key"], diff_of(i)),
                range(8),
            )
        )
    ok = [r for r in results if r[0] == 200]
    late = [r for r in results if r[0] != 200 and "too late" in r[1]["error"]]
    assert len(ok) == 3 and len(late) == 5, results
    st = Admin(server.url).status()
    assert [c["number"] for c in st["checkpoints"]] == [1, 2]
    assert st["cycles"][0]["reported"] == 3
    for w in workers:
        w.close()
