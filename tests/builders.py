"""Builders shared by every test directory: the admin token, RSA keys, tiny ONNX plans,
models and diffs, host payloads, and private PostgreSQL databases. Plain functions (the
fixtures wrapping them are in tests/conftest.py), so a test module imports them from here."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from gridfl import state

#: the admin token of every test node (in-thread LiveNode and ``gridfl serve`` processes)
ADMIN = "test-admin-token"
#: the parameter shapes of the tiny averaging model the node tests host
SHAPES = [(4, 3), (3,)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- RSA keys
def rsa_key_pair() -> tuple[str, str]:
    """A fresh 2048-bit RSA key pair (PEM): (private PKCS8, public SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


# --------------------------------------------------------------------------- plans and models
# onnx is imported where used: it is an optional dependency (the ``torch`` extra), and
# modules that only need payloads of ready bytes must import without it
def _plan_bytes(nodes, inputs, outputs, kind, in_meta, out_meta) -> bytes:
    import onnx
    from onnx import helper

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
    from onnx import TensorProto, helper

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


def proximal_training_plan(shapes=SHAPES) -> bytes:
    """A FedProx plan (global_param inputs, client_config ``proximal_mu``): new_p = p -
    lr * mu * (p - g), the proximal term's gradient step alone; loads and runs."""
    import onnx
    from onnx import TensorProto

    model = onnx.load_from_string(training_plan(shapes))
    graph = model.graph
    meta = {p.key: p for p in model.metadata_props}
    in_meta = json.loads(meta["gridfl.inputs"].value)
    f = TensorProto.FLOAT
    for i, shape in enumerate(shapes):
        graph.input.append(onnx.helper.make_tensor_value_info(f"g{i}", f, list(shape)))
        in_meta.append({"name": f"g{i}", "role": "global_param", "index": i})
    graph.input.append(onnx.helper.make_tensor_value_info("mu", f, []))
    in_meta.append({"name": "mu", "role": "client_config", "key": "proximal_mu"})
    for node in graph.node:  # step{i} = lr * p{i}  ->  lr * mu * (p{i} - g{i})
        if node.op_type == "Mul" and node.input[0].startswith("p"):
            i = node.input[0][1:]
            node.input[0] = f"pull{i}"
    for i in range(len(shapes)):
        graph.node.insert(0, onnx.helper.make_node("Mul", [f"d{i}", "mu"], [f"pull{i}"]))
        graph.node.insert(0, onnx.helper.make_node("Sub", [f"p{i}", f"g{i}"], [f"d{i}"]))
    meta["gridfl.inputs"].value = json.dumps(in_meta)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def averaging_plan(shapes=SHAPES) -> bytes:
    """PyGrid's iterative average: new_avg = (avg * num + item) / (num + 1)."""
    from onnx import TensorProto, helper

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


# --------------------------------------------------------------------------- linear regression plan
# for the worker SDK tests: linear regression with MSE, one SGD step (optionally with
# momentum, so the plan has ``optimizer_state`` inputs and outputs). Signature in PyGrid
# order: ``(X, y, batch_size, lr, W, b[, vW, vb]) -> (loss, mae, W', b'[, vW', vb'])``.
def linear_sgd_plan(features: int = 3, *, momentum: float | None = None) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("X", f32, ["N", features]),
        helper.make_tensor_value_info("y", f32, ["N", 1]),
        helper.make_tensor_value_info("batch_size", TensorProto.INT64, []),
        helper.make_tensor_value_info("lr", f32, []),
        helper.make_tensor_value_info("W", f32, [features, 1]),
        helper.make_tensor_value_info("b", f32, [1]),
    ]
    in_meta = [
        {"name": "X", "role": "data"},
        {"name": "y", "role": "target"},
        {"name": "batch_size", "role": "batch_size"},
        {"name": "lr", "role": "client_config", "key": "lr"},
        {"name": "W", "role": "model_param", "index": 0},
        {"name": "b", "role": "model_param", "index": 1},
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["pred"]),
        helper.make_node("Sub", ["pred", "y"], ["err"]),
        helper.make_node("Mul", ["err", "err"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["loss"], keepdims=0),
        helper.make_node("Abs", ["err"], ["abserr"]),
        helper.make_node("ReduceMean", ["abserr"], ["mae"], keepdims=0),
        helper.make_node("Cast", ["batch_size"], ["bs_f"], to=f32),
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", f32, [], [2.0])),
        helper.make_node("Div", ["two", "bs_f"], ["scale"]),
        helper.make_node("Mul", ["err", "scale"], ["g_pred"]),
        helper.make_node("Transpose", ["X"], ["Xt"], perm=[1, 0]),
        helper.make_node("MatMul", ["Xt", "g_pred"], ["gW"]),
        helper.make_node(
            "Constant", [], ["axes0"],
            value=helper.make_tensor("axes0", TensorProto.INT64, [1], [0]),
        ),
        helper.make_node("ReduceSum", ["g_pred", "axes0"], ["gb"], keepdims=0),
    ]
    outputs = [
        helper.make_tensor_value_info("loss", f32, []),
        helper.make_tensor_value_info("mae", f32, []),
        helper.make_tensor_value_info("W_new", f32, [features, 1]),
        helper.make_tensor_value_info("b_new", f32, [1]),
    ]
    out_meta = [
        {"name": "loss", "role": "loss"},
        {"name": "mae", "role": "metric", "key": "mae"},
        {"name": "W_new", "role": "model_param", "index": 0},
        {"name": "b_new", "role": "model_param", "index": 1},
    ]
    if momentum is None:
        nodes += [
            helper.make_node("Mul", ["gW", "lr"], ["stepW"]),
            helper.make_node("Mul", ["gb", "lr"], ["stepb"]),
        ]
    else:
        inputs += [
            helper.make_tensor_value_info("vW", f32, [features, 1]),
            helper.make_tensor_value_info("vb", f32, [1]),
        ]
        in_meta += [
            {"name": "vW", "role": "optimizer_state", "index": 0},
            {"name": "vb", "role": "optimizer_state", "index": 1},
        ]
        nodes += [
            helper.make_node(
                "Constant", [], ["mu"], value=helper.make_tensor("mu", f32, [], [momentum])
            ),
            helper.make_node("Mul", ["vW", "mu"], ["mvW"]),
            helper.make_node("Add", ["mvW", "gW"], ["vW_new"]),
            helper.make_node("Mul", ["vb", "mu"], ["mvb"]),
            helper.make_node("Add", ["mvb", "gb"], ["vb_new"]),
            helper.make_node("Mul", ["vW_new", "lr"], ["stepW"]),
            helper.make_node("Mul", ["vb_new", "lr"], ["stepb"]),
        ]
        outputs += [
            helper.make_tensor_value_info("vW_new", f32, [features, 1]),
            helper.make_tensor_value_info("vb_new", f32, [1]),
        ]
        out_meta += [
            {"name": "vW_new", "role": "optimizer_state", "index": 0},
            {"name": "vb_new", "role": "optimizer_state", "index": 1},
        ]
    nodes += [
        helper.make_node("Sub", ["W", "stepW"], ["W_new"]),
        helper.make_node("Sub", ["b", "stepb"], ["b_new"]),
    ]
    graph = helper.make_graph(nodes, "linear_sgd", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(
        model,
        {
            "gridfl.format": "1",
            "gridfl.kind": "training",
            "gridfl.inputs": json.dumps(in_meta),
            "gridfl.outputs": json.dumps(out_meta),
        },
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_data(n: int = 256, features: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples of y = X @ w_true + 0.5 (+ small noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    w_true = np.arange(1, features + 1, dtype=np.float32).reshape(features, 1)
    y = x @ w_true + 0.5 + 0.01 * rng.normal(size=(n, 1)).astype(np.float32)
    return x, y.astype(np.float32)


def linear_params(features: int = 3) -> list[np.ndarray]:
    return [np.zeros((features, 1), np.float32), np.zeros(1, np.float32)]


# --------------------------------------------------------------------------- PostgreSQL
def postgres_test_url() -> str:
    """The shared test cluster's URL; skips the test without one (fails in CI)."""
    url = os.environ.get("GRIDFL_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("GRIDFL_TEST_POSTGRES_URL is not set in CI: PostgreSQL tests must run")
        pytest.skip("no PostgreSQL: run under `make test` or `. scripts/ensure-postgres`")
    return url


@contextlib.contextmanager
def private_postgres_database(prefix: str = "gridfl_t") -> Iterator[str]:
    """A new, empty database on the shared test cluster, dropped on exit; yields its URL."""
    import sqlalchemy as sa

    url = sa.make_url(postgres_test_url())
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def reset_postgres_schema(url: str) -> None:
    """Empty a database by dropping its ``public`` schema (cheaper than a new database)."""
    import sqlalchemy as sa

    eng = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("DROP SCHEMA public CASCADE")
        c.exec_driver_sql("CREATE SCHEMA public")
    eng.dispose()


def linear_eval_plan(features: int = 3) -> bytes:
    """The evaluation plan of :func:`linear_sgd_plan`'s model:
    ``(X, y, W, b) -> (mse loss, mae)``."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("X", f32, ["N", features]),
        helper.make_tensor_value_info("y", f32, ["N", 1]),
        helper.make_tensor_value_info("W", f32, [features, 1]),
        helper.make_tensor_value_info("b", f32, [1]),
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["pred"]),
        helper.make_node("Sub", ["pred", "y"], ["err"]),
        helper.make_node("Mul", ["err", "err"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["loss"], keepdims=0),
        helper.make_node("Abs", ["err"], ["abserr"]),
        helper.make_node("ReduceMean", ["abserr"], ["mae"], keepdims=0),
    ]
    outputs = [
        helper.make_tensor_value_info("loss", f32, []),
        helper.make_tensor_value_info("mae", f32, []),
    ]
    return _plan_bytes(
        nodes, inputs, outputs, "evaluation",
        [{"name": "X", "role": "data"}, {"name": "y", "role": "target"},
         {"name": "W", "role": "model_param", "index": 0},
         {"name": "b", "role": "model_param", "index": 1}],
        [{"name": "loss", "role": "loss"}, {"name": "mae", "role": "metric", "key": "mae"}],
    )


def demo_options(tmp_path, **overrides):
    """A quick ``gridfl demo`` run's options: the 2NN, 4 clients of 300 examples, 2 worker
    processes training 2 per cycle, 3 cycles, no target; data and results under
    ``tmp_path``. ``overrides`` are any other :class:`~gridfl.demo.run.DemoOptions`.

    >>> from pathlib import Path
    >>> demo_options(Path("/tmp/x"), cycles=5).cycles
    5
    """
    from gridfl.demo.run import DemoOptions

    quick = {
        "model": "2nn", "clients": 4, "fraction": 0.5, "workers": 2, "cycles": 3,
        "target": None, "examples_per_client": 300,
        "data_dir": tmp_path / "data", "out_dir": tmp_path / "out",
    }
    return DemoOptions(**{**quick, **overrides})


def plain_session_outputs(model: bytes, feed: dict) -> list[np.ndarray]:
    """``model`` run on ``feed`` by a plain one-thread onnxruntime session: the graph as
    written, in onnxruntime's own order."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, feed)


def assert_same_step(got: list, want: list) -> None:
    """Two training steps' outputs agree to float32 tolerance, output by output."""
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def compiled_conv_step(channels: int) -> tuple[bytes, list, list[np.ndarray]]:
    """A compiled two-convolution training plan (the second layer ``channels`` in,
    ``2 * channels`` out), the inputs of one step, and what the plan as written gives
    for them (:func:`plain_session_outputs`)."""
    import torch

    from gridfl.compiler import SGD, compile_training_plan

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(channels, 2 * channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(2 * channels * 6 * 6, 10))
    X, y = torch.rand(4, 1, 6, 6), torch.randint(0, 10, (4,))
    plan = compile_training_plan(net, optimizer=SGD(lr=0.1), example_data=X, example_target=y)
    inputs = [X, y, 4, 0.1, *(p.detach().numpy() for p in net.parameters())]
    feed = {s.name: plan.convert(i, v)
            for i, (s, v) in enumerate(zip(plan.inputs, inputs, strict=True))}
    return plan.to_bytes(), inputs, plain_session_outputs(plan.to_bytes(), feed)
