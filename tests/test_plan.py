"""gridfl.plan: loading, metadata validation, input conversion and errors.

These tests build small ONNX graphs by hand (no torch compiler needed).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from gridfl import PlanInputError, PlanLoadError  # noqa: E402
from gridfl.plan import Plan, PlanSlot, default_threads  # noqa: E402

INPUTS = [
    {"name": "X", "role": "data"},
    {"name": "y", "role": "target"},
    {"name": "batch_size", "role": "batch_size"},
    {"name": "lr", "role": "client_config", "key": "lr"},
    {"name": "W", "role": "model_param", "index": 0},
]
OUTPUTS = [
    {"name": "loss", "role": "loss"},
    {"name": "acc", "role": "metric", "key": "accuracy"},
    {"name": "new_W", "role": "model_param", "index": 0},
]


def make_model(meta: dict | None = None, *, inputs=INPUTS, outputs=OUTPUTS) -> bytes:
    """loss = sum(X) / batch_size; acc = count(y == 1) / batch_size; new_W = W - lr * W.

    ``lr`` is declared with shape (1,), ``batch_size`` as a 0-d tensor.
    """
    f = TensorProto.FLOAT
    g_inputs = [
        helper.make_tensor_value_info("X", f, ["N", 3]),
        helper.make_tensor_value_info("y", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("batch_size", f, []),
        helper.make_tensor_value_info("lr", f, [1]),
        helper.make_tensor_value_info("W", f, [2, 3]),
    ]
    g_outputs = [
        helper.make_tensor_value_info("loss", f, []),
        helper.make_tensor_value_info("acc", f, []),
        helper.make_tensor_value_info("new_W", f, [2, 3]),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["X"], ["sx"], keepdims=0),
        helper.make_node("Div", ["sx", "batch_size"], ["loss"]),
        helper.make_node(
            "Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [], [1])
        ),
        helper.make_node("Equal", ["y", "one"], ["eq"]),
        helper.make_node("Cast", ["eq"], ["eqf"], to=f),
        helper.make_node("ReduceSum", ["eqf"], ["neq"], keepdims=0),
        helper.make_node("Div", ["neq", "batch_size"], ["acc"]),
        helper.make_node("Mul", ["lr", "W"], ["step"]),
        helper.make_node("Sub", ["W", "step"], ["new_W"]),
    ]
    graph = helper.make_graph(nodes, "tiny", g_inputs, g_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if meta is None:
        meta = {
            "gridfl.format": "1",
            "gridfl.kind": "training",
            "gridfl.inputs": json.dumps(inputs),
            "gridfl.outputs": json.dumps(outputs),
        }
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def plan_bytes() -> bytes:
    return make_model()


@pytest.fixture(scope="module")
def plan(plan_bytes) -> Plan:
    return Plan.from_bytes(plan_bytes, threads=1)


X = np.arange(12, dtype=np.float32).reshape(4, 3)
Y = np.array([1, 0, 1, 1], dtype=np.int64)
W = np.ones((2, 3), dtype=np.float32)


def test_metadata_and_slots(plan, plan_bytes):
    assert plan.kind == "training"
    assert [s.role for s in plan.inputs] == [
        "data", "target", "batch_size", "client_config", "model_param"
    ]
    assert plan.inputs[0] == PlanSlot("X", "data", None, None, np.dtype("float32"), (None, 3))
    assert plan.inputs[3].key == "lr" and plan.inputs[3].shape == (1,)
    assert plan.inputs[2].shape == ()
    assert plan.outputs[1] == PlanSlot("acc", "metric", "accuracy", None, np.dtype("float32"), ())
    assert plan.num_params == 1
    assert plan.param_shapes == [(2, 3)]
    assert plan.client_config_keys == ["lr"]
    assert plan.metric_names == ["accuracy"]
    assert plan.num_optimizer_state == 0
    assert plan.to_bytes() == plan_bytes
    assert Plan.from_bytes(plan.to_bytes()).inputs == plan.inputs
    assert "training" in repr(plan)


def test_execute_numpy_and_scalars(plan):
    loss, acc, new_w = plan.execute(X, Y, 4, 0.5, W)
    assert loss.dtype == np.float32 and loss.shape == ()
    assert float(loss) == pytest.approx(66 / 4)
    assert float(acc) == pytest.approx(0.75)
    np.testing.assert_allclose(new_w, W * 0.5)
    # 0-d / shape-(1,) interchangeable, float64 and int inputs are cast
    loss2, _, new_w2 = plan.execute(X.astype(np.float64), Y.astype(np.int32),
                                    np.array([4]), np.array(0.5), W.astype(np.float64))
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(new_w2, new_w)
    # a batch of another size works (dynamic batch dimension)
    loss3, acc3, _ = plan.execute(X[:3], Y[:3], 3, 0.5, W)
    assert float(loss3) == pytest.approx(36 / 3)
    assert float(acc3) == pytest.approx(2 / 3)


def test_execute_torch_tensors(plan):
    torch = pytest.importorskip("torch")
    w = torch.ones(2, 3, requires_grad=True)
    loss, _acc, new_w = plan.execute(torch.from_numpy(X), torch.from_numpy(Y),
                                    torch.tensor(4.0), torch.tensor([0.5]), w)
    assert float(loss) == pytest.approx(66 / 4)
    np.testing.assert_allclose(new_w, W * 0.5)
    # float class labels that are integral are accepted for an int64 target
    plan.execute(X, torch.tensor([1.0, 0.0, 1.0, 1.0]), 4, 0.5, W)


def test_bind(plan):
    args = plan.bind(data=X, target=Y, params=[W], client_config={"lr": 0.5})
    assert args[2] == 4  # batch_size defaults to len(data)
    _loss, _acc, new_w = plan.execute(*args)
    np.testing.assert_allclose(new_w, W * 0.5)
    with pytest.raises(PlanInputError, match="client_config lacks 'lr'"):
        plan.bind(data=X, target=Y, params=[W], client_config={})
    with pytest.raises(PlanInputError, match="model_param #0"):
        plan.bind(data=X, target=Y, params=[], client_config={"lr": 1})


def test_convert_and_run_are_execute_in_two_steps(plan):
    """convert() gives what execute() would feed, PlanSlot.matches() accepts it, and
    run() on that feed gives execute()'s outputs; run() checks nothing itself, so a wrong
    feed is onnxruntime's error, reported as a PlanInputError."""
    args = (X.astype(np.float64), Y.astype(np.int32), 4, 0.5, W)
    pairs = enumerate(zip(plan.inputs, args, strict=True))
    feed = {s.name: plan.convert(i, v) for i, (s, v) in pairs}
    assert feed["batch_size"].shape == () and feed["lr"].shape == (1,)
    assert feed["X"].dtype == np.float32 and feed["y"].dtype == np.int64
    assert all(s.matches(feed[s.name]) for s in plan.inputs)
    for got, want in zip(plan.run(feed), plan.execute(*args), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(PlanInputError, match=r"input #4 'W' \(model_param 0\): expected shape"):
        plan.convert(4, W.T)
    with pytest.raises(PlanInputError, match="onnxruntime failed to run the plan"):
        plan.run({**feed, "W": W.astype(np.float64)})
    with pytest.raises(PlanInputError, match="onnxruntime failed to run the plan"):
        plan.run({k: v for k, v in feed.items() if k != "lr"})


def test_slot_matches_only_exact_arrays(plan):
    w, x = plan.inputs[4], plan.inputs[0]
    assert w.matches(W) and x.matches(X) and x.matches(X[:1])  # any size on N
    assert not w.matches(W.astype(np.float64))
    assert not w.matches(W.tolist())
    assert not w.matches(np.ones((3, 2), np.float32))
    assert not w.matches(np.ones((2, 3, 1), np.float32))
    assert not w.matches(np.asfortranarray(np.ones((2, 3), np.float32)))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((X, Y, 4, 0.5), r"takes 5 inputs, got 4.*'W' \(model_param 0\)"),
        ((X, Y, 4, 0.5, W, W), "takes 5 inputs, got 6"),
        ((X, Y, 4, 0.5, W.T), r"#4 'W' \(model_param 0\): expected shape \(2, 3\), got \(3,"),
        ((X[:, :2], Y, 4, 0.5, W), r"'X' \(data\): expected shape \(N, 3\), got \(4, 2\)"),
        ((X, Y, 4, [0.5, 0.1], W), r"'lr' \(client_config 'lr'\): expected shape \(1,\)"),
        ((X, Y, np.ones(2), 0.5, W), r"'batch_size' \(batch_size\): expected shape \(\)"),
        ((X, Y + 0.5, 4, 0.5, W), r"'y' \(target\): expected dtype int64, got float64"),
        ((X.astype(np.complex64), Y, 4, 0.5, W), r"'X' \(data\): .* got complex64"),
        ((np.full((4, 3), "a"), Y, 4, 0.5, W), r"'X' \(data\): expected dtype float32"),
        ((X, Y, "four", 0.5, W), r"'batch_size' \(batch_size\): expected dtype float32"),
        ((X, Y[:3], 4, 0.5, W), "data and target batch sizes differ"),
        ((X, Y, 4, object(), W), r"'lr' \(client_config 'lr'\)"),
    ],
)
def test_input_errors(plan, args, match):
    with pytest.raises(PlanInputError, match=match):
        plan.execute(*args)


def _meta(**over):
    meta = {
        "gridfl.format": "1",
        "gridfl.kind": "training",
        "gridfl.inputs": json.dumps(INPUTS),
        "gridfl.outputs": json.dumps(OUTPUTS),
    }
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def _ins(entries):
    return make_model(_meta(**{"gridfl.inputs": json.dumps(entries)}))


def _outs(entries):
    return make_model(_meta(**{"gridfl.outputs": json.dumps(entries)}))


W_NO_INDEX = {"name": "W", "role": "model_param"}
LR_NO_KEY = {"name": "lr", "role": "client_config"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"not an onnx model at all", "onnxruntime cannot load the plan"),
        (b"\x08\x07\x12\x00" * 50, "onnxruntime cannot load|not a gridfl plan"),
        (make_model({}), "no 'gridfl.format' metadata"),
        (make_model(_meta(**{"gridfl.format": "2"})), "unsupported gridfl plan format '2'"),
        (make_model(_meta(**{"gridfl.kind": "inference"})), "'gridfl.kind' is 'inference'"),
        (make_model(_meta(**{"gridfl.kind": None})), "'gridfl.kind' is None"),
        (make_model(_meta(**{"gridfl.inputs": None})), "lacks 'gridfl.inputs'"),
        (make_model(_meta(**{"gridfl.inputs": "[{"})), "not valid JSON"),
        (make_model(_meta(**{"gridfl.inputs": "{}"})), "must be a JSON list"),
        (_ins(INPUTS[:4]), "describes 4 slots but the graph has 5"),
        (_outs(OUTPUTS[::-1]), "names 'new_W' but graph slot 0 is 'loss'"),
        (_ins([*INPUTS[:4], {"name": "W", "role": "weights"}]), "unknown role 'weights'"),
        (_ins([*INPUTS[:4], W_NO_INDEX]), "needs a non-negative int 'index'"),
        (_ins([*INPUTS[:4], W_NO_INDEX | {"index": 1}]), r"indices must be 0..0, got \[1\]"),
        (_ins([*INPUTS[:3], LR_NO_KEY, INPUTS[4]]), "needs a string 'key'"),
        (_ins([*INPUTS[:2], INPUTS[1] | {"name": "batch_size"}, *INPUTS[3:]]), "declares .* twice"),
        (_outs([OUTPUTS[0], ["x"], OUTPUTS[2]]), "must be a JSON object"),
    ],
)
def test_load_errors(data, match):
    with pytest.raises(PlanLoadError, match=match):
        Plan.from_bytes(data)


def test_load_rejects_non_bytes():
    with pytest.raises(PlanLoadError, match="must be bytes"):
        Plan.from_bytes("plan")  # type: ignore[arg-type]


def test_threads(plan_bytes, monkeypatch):
    assert Plan.from_bytes(plan_bytes, threads=3).threads == 3
    monkeypatch.setenv("GRIDFL_PLAN_THREADS", "2")
    assert default_threads() == 2
    assert Plan.from_bytes(plan_bytes).threads == 2
    monkeypatch.delenv("GRIDFL_PLAN_THREADS")
    assert 1 <= default_threads() <= 4
    with pytest.raises(ValueError):
        Plan.from_bytes(plan_bytes, threads=0)


def test_session_created_once(plan):
    plan.execute(X, Y, 4, 0.5, W)
    s = plan.session
    plan.execute(X, Y, 4, 0.5, W)
    assert plan.session is s


def test_training_sessions_have_no_memory_pattern(plan_bytes):
    # A training step's memory pattern is a second pre-planned block next to the arena
    # (~8 MB per McMahan CNN worker) that buys no speed: training sessions go without it.
    training = Plan.from_bytes(plan_bytes, threads=1)
    evaluation = Plan.from_bytes(make_model(_meta(**{"gridfl.kind": "evaluation"})), threads=1)
    assert training.kind == "training" and evaluation.kind == "evaluation"
    assert training.session.get_session_options().enable_mem_pattern is False
    assert evaluation.session.get_session_options().enable_mem_pattern is True
    assert training.session.get_session_options().enable_cpu_mem_arena is True
    loss, acc, new_w = training.execute(X, Y, 4, 0.5, W)
    assert float(loss) == 16.5 and float(acc) == 0.75 and np.allclose(new_w, 0.5)


def test_plan_module_imports_neither_torch_nor_onnx():
    code = (
        "import sys, gridfl.plan; "
        "bad = [m for m in ('torch', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
