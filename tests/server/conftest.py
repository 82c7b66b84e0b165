"""Fixtures of the grid node tests: tiny ONNX plans, a live uvicorn server on loopback,
plain HTTP / WebSocket worker clients, and the database backends (SQLite file, PostgreSQL)."""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid

import numpy as np
import pytest

pytest.importorskip("starlette")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from gridfl import state  # noqa: E402
from tests._live import LiveNode, free_port  # noqa: E402, F401 - free_port: re-exported

ADMIN = "test-admin-token"
SHAPES = [(4, 3), (3,)]


# --------------------------------------------------------------------------- plans and models
def _plan_bytes(nodes, inputs, outputs, kind, in_meta, out_meta) -> bytes:
    graph = helper.make_graph(nodes, f"{kind}_plan", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {
        "gridfl.format": "1",
        "gridfl.kind": kind,
        "gridfl.inputs": json.dumps(in_meta),
        "gridfl.outputs": json.dumps(out_meta),
    }.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def training_plan(shapes=SHAPES) -> bytes:
    """(X, y, batch_size, lr, *params) -> (loss, acc, *params - lr * params): loads, runs."""
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("X", f, ["N", 4]),
        helper.make_tensor_value_info("y", f, ["N", 3]),
        helper.make_tensor_value_info("batch_size", TensorProto.INT64, []),
        helper.make_tensor_value_info("lr", f, []),
    ]
    in_meta = [
        {"name": "X", "role": "data"},
        {"name": "y", "role": "target"},
        {"name": "batch_size", "role": "batch_size"},
        {"name": "lr", "role": "client_config", "key": "lr"},
    ]
    outputs = [
        helper.make_tensor_value_info("loss", f, []),
        helper.make_tensor_value_info("acc", f, []),
    ]
    out_meta = [
        {"name": "loss", "role": "loss"},
        {"name": "acc", "role": "metric", "key": "accuracy"},
    ]
    nodes = [
        helper.make_node("ReduceMean", ["X"], ["loss"], keepdims=0),
        helper.make_node("ReduceMean", ["y"], ["acc"], keepdims=0),
    ]
    for i, shape in enumerate(shapes):
        inputs.append(helper.make_tensor_value_info(f"p{i}", f, list(shape)))
        in_meta.append({"name": f"p{i}", "role": "model_param", "index": i})
        outputs.append(helper.make_tensor_value_info(f"new_p{i}", f, list(shape)))
        out_meta.append({"name": f"new_p{i}", "role": "model_param", "index": i})
        nodes += [
            helper.make_node("Mul", [f"p{i}", "lr"], [f"step{i}"]),
            helper.make_node("Sub", [f"p{i}", f"step{i}"], [f"new_p{i}"]),
        ]
    return _plan_bytes(nodes, inputs, outputs, "training", in_meta, out_meta)


def averaging_plan(shapes=SHAPES) -> bytes:
    """PyGrid's iterative average: new_avg = (avg * num + item) / (num + 1)."""
    f = TensorProto.FLOAT
    inputs, in_meta, outputs, out_meta, nodes = [], [], [], [], []
    for i, shape in enumerate(shapes):
        inputs.append(helper.make_tensor_value_info(f"avg{i}", f, list(shape)))
        in_meta.append({"name": f"avg{i}", "role": "average", "index": i})
    for i, shape in enumerate(shapes):
        inputs.append(helper.make_tensor_value_info(f"item{i}", f, list(shape)))
        in_meta.append({"name": f"item{i}", "role": "item", "index": i})
    inputs.append(helper.make_tensor_value_info("num", f, [1]))
    in_meta.append({"name": "num", "role": "count"})
    nodes.append(
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("c", f, [1], [1.0]))
    )
    nodes.append(helper.make_node("Add", ["num", "one"], ["num1"]))
    for i, shape in enumerate(shapes):
        nodes += [
            helper.make_node("Mul", [f"avg{i}", "num"], [f"s{i}"]),
            helper.make_node("Add", [f"s{i}", f"item{i}"], [f"t{i}"]),
            helper.make_node("Div", [f"t{i}", "num1"], [f"new{i}"]),
        ]
        outputs.append(helper.make_tensor_value_info(f"new{i}", f, list(shape)))
        out_meta.append({"name": f"new{i}", "role": "average", "index": i})
    return _plan_bytes(nodes, inputs, outputs, "averaging", in_meta, out_meta)


def model_params(seed: int = 0, shapes=SHAPES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def host_payload(
    name: str = "mnist",
    version: str = "1.0",
    server_config: dict | None = None,
    *,
    params=None,
    avg_plan: bool = False,
    protocols: dict | None = None,
    plans: dict | None = None,
) -> dict:
    params = params if params is not None else model_params()
    sc = {"cycle_length": 60, "num_cycles": 3, "max_diffs": 2}
    sc.update(server_config or {})
    payload = {
        "client_config": {
            "name": name,
            "version": version,
            "batch_size": 8,
            "lr": 0.1,
            "max_updates": 2,
        },
        "server_config": sc,
        "model": b64(state.dumps(params)),
        "plans": plans if plans is not None else {"training_plan": b64(training_plan())},
        "protocols": {k: b64(v) for k, v in (protocols or {}).items()},
    }
    if avg_plan:
        payload["averaging_plan"] = b64(averaging_plan())
    return payload


def diff_of(seed: int, shapes=SHAPES) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in shapes]


# --------------------------------------------------------------------------- databases
def _pg_url() -> str | None:
    url = os.environ.get("GRIDFL_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("GRIDFL_TEST_POSTGRES_URL is not set in CI: PostgreSQL tests must run")
        pytest.skip("no PostgreSQL: run under `make test` or `. scripts/ensure-postgres`")
    return url


@pytest.fixture(scope="session")
def pg_database():
    """A private PostgreSQL database for this test session (dropped at the end)."""
    import sqlalchemy as sa

    url = sa.make_url(_pg_url())
    name = f"gridfl_t_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _reset_pg(url: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("DROP SCHEMA public CASCADE")
        c.exec_driver_sql("CREATE SCHEMA public")
    eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """Both storage backends: a fresh SQLite file, or a freshly emptied PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'grid.db'}"
    url = request.getfixturevalue("pg_database")
    _reset_pg(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'grid.db'}"


# --------------------------------------------------------------------------- live server
class LiveServer(LiveNode):
    """A real uvicorn server on loopback, in a thread (``ws_url`` ends in ``/``)."""

    def __init__(self, settings):
        super().__init__(settings)
        self.ws_url = f"ws://127.0.0.1:{self.port}/"


def make_settings(db_url: str, tmp_path, **kw):
    from gridfl.server import Settings

    kw.setdefault("admin_token", ADMIN)
    kw.setdefault("speed_test_bytes", 1 << 20)
    return Settings(data_dir=tmp_path, database_url=db_url, **kw)


@pytest.fixture
def server_factory(tmp_path, sqlite_url):
    started = []

    def start(db_url: str | None = None, **kw) -> LiveServer:
        srv = LiveServer(make_settings(db_url or sqlite_url, tmp_path, **kw))
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def server(server_factory) -> LiveServer:
    return server_factory()


# --------------------------------------------------------------------------- clients
class Admin:
    def __init__(self, url: str, token: str = ADMIN):
        import httpx

        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    def host(self, payload: dict):
        return self.http.post("/gridfl/v1/processes", json=payload)

    def status(self, name="mnist", version="1.0") -> dict:
        r = self.http.get(f"/gridfl/v1/processes/{name}/{version}")
        assert r.status_code == 200, r.text
        return r.json()

    def checkpoint(self, ref="latest", name="mnist", version="1.0") -> list[np.ndarray]:
        r = self.http.get(f"/gridfl/v1/processes/{name}/{version}/checkpoints/{ref}")
        assert r.status_code == 200, r.text
        return state.loads(r.content)


class HttpWorker:
    """A plain HTTP worker: ``call(type, data) -> (status, data)``."""

    transport = "http"

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=60)

    def call(self, kind: str, data: dict) -> tuple[int, dict]:
        r = self.http.post("/" + kind, json=data)
        return r.status_code, r.json()

    def get(self, path: str, **params):
        return self.http.get("/model-centric/" + path, params=params)

    def close(self):
        self.http.close()


class WsWorker(HttpWorker):
    """A plain WebSocket worker (downloads still go over HTTP, as in PyGrid)."""

    transport = "ws"

    def __init__(self, url: str, ws_url: str):
        from websockets.sync.client import connect

        super().__init__(url)
        self._cm = connect(ws_url, max_size=None, open_timeout=20)
        self.ws = self._cm.__enter__()
        self.lock = threading.Lock()

    def call(self, kind: str, data: dict) -> tuple[int, dict]:
        rid = uuid.uuid4().hex
        with self.lock:
            self.ws.send(json.dumps({"type": kind, "request_id": rid, "data": data}))
            reply = json.loads(self.ws.recv(timeout=60))
        assert reply.get("request_id") == rid
        assert reply.get("type") == kind
        body = reply["data"]
        return (200 if "error" not in body else 400), body

    def close(self):
        self._cm.__exit__(None, None, None)
        super().close()


class WsBinWorker(WsWorker):
    """A WebSocket worker that sends reports as binary frames (gridfl extension), built
    by hand from docs/protocol.md: 4-byte big-endian header length, the UTF-8 JSON header
    ``{"type", "request_id", "data": everything but diff}``, then the raw diff bytes."""

    transport = "wsbin"

    def __init__(self, url: str, ws_url: str):
        from websockets.sync.client import connect

        HttpWorker.__init__(self, url)
        self._cm = connect(
            ws_url, max_size=None, open_timeout=20, subprotocols=["gridfl.binary.2"]
        )
        self.ws = self._cm.__enter__()
        self.lock = threading.Lock()

    def call(self, kind: str, data: dict) -> tuple[int, dict]:
        if kind != "model-centric/report" or not isinstance(data.get("diff"), str):
            return super().call(kind, data)
        rid = uuid.uuid4().hex
        fields = {k: v for k, v in data.items() if k != "diff"}
        head = json.dumps({"type": kind, "request_id": rid, "data": fields}).encode()
        frame = len(head).to_bytes(4, "big") + head + base64.b64decode(data["diff"])
        with self.lock:
            self.ws.send(frame)
            reply = json.loads(self.ws.recv(timeout=60))
        assert reply.get("request_id") == rid
        assert reply.get("type") == kind
        body = reply["data"]
        return (200 if "error" not in body else body["status_code"]), body


@pytest.fixture
def admin(server) -> Admin:
    return Admin(server.url)


@pytest.fixture(params=["http", "ws"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def worker_factory(server, transport):
    made = []

    def make(srv=None, kind: str | None = None):
        srv = srv or server
        kind = kind or transport
        w = HttpWorker(srv.url) if kind == "http" else WsWorker(srv.url, srv.ws_url)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def join(worker, name="mnist", version="1.0", token=None, **speeds) -> tuple[str, dict]:
    """authenticate + cycle-request; returns (worker_id, cycle-request data)."""
    data = {"model_name": name}
    if version is not None:
        data["model_version"] = version
    if token is not None:
        data["auth_token"] = token
    st, auth = worker.call("model-centric/authenticate", data)
    assert st == 200, auth
    req = {"worker_id": auth["worker_id"], "model": name, **speeds}
    if version is not None:
        req["version"] = version
    st, cyc = worker.call("model-centric/cycle-request", req)
    assert st == 200, cyc
    return auth["worker_id"], cyc


def report(worker, worker_id: str, key: str, diff, **extra) -> tuple[int, dict]:
    if not isinstance(diff, (bytes, str)):
        diff = state.dumps(diff)
    if isinstance(diff, bytes):
        diff = b64(diff)
    return worker.call(
        "model-centric/report", {"worker_id": worker_id, "request_key": key, "diff": diff, **extra}
    )
