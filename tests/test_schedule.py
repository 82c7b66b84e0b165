"""A plan's nodes run in gridfl's order: the same graph and results, each copy next to its
reader. The order is read back from the bytes with the onnx library (an independent
parser) and checked against what the schedule promises."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from gridfl import _schedule
from tests.builders import assert_same_step, compiled_conv_step, plain_session_outputs

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _names(model: bytes) -> list[str]:
    return [n.name for n in onnx.load_from_string(model).graph.node]


def _node(op, inputs, outputs, name, **attrs):
    return helper.make_node(op, inputs, outputs, name=name, **attrs)


# A forward chain (relu, exp, log) and a copy of the relu's output (transpose, slice)
# that only the last node reads: written, as an exporter may, right after the relu.
HOISTED = [
    _node("Relu", ["x"], ["a"], "relu"),
    _node("Transpose", ["a"], ["t"], "transpose", perm=[1, 0]),
    _node("Slice", ["t", "starts", "ends"], ["s"], "slice"),
    _node("Exp", ["a"], ["e"], "exp"),
    _node("Log", ["e"], ["l"], "log"),
    _node("MatMul", ["l", "s"], ["y"], "matmul"),
]
HOISTED_IO = ([_f32("x", [3, 3]), helper.make_tensor_value_info("starts", TensorProto.INT64, [1]),
               helper.make_tensor_value_info("ends", TensorProto.INT64, [1])], [_f32("y", None)])


def test_a_copy_runs_just_before_its_reader():
    model = _model(HOISTED, *HOISTED_IO)
    ordered = _schedule.schedule(model, model)
    assert _names(ordered) == ["relu", "exp", "log", "transpose", "slice", "matmul"]
    feed = {"x": np.arange(9, dtype=np.float32).reshape(3, 3) - 4,
            "starts": np.array([0]), "ends": np.array([3])}
    np.testing.assert_array_equal(plain_session_outputs(ordered, feed)[0],
                                  plain_session_outputs(model, feed)[0])


def test_a_node_the_optimizer_made_runs_right_after_its_inputs():
    """Nodes follow the plan's order; one the plan does not have (a fusion) goes as early
    as its inputs allow instead of last."""
    plan = _model([
        _node("Relu", ["x"], ["a"], "relu"),
        _node("Exp", ["x"], ["b"], "exp"),
        _node("Neg", ["b"], ["c"], "neg"),
        _node("Add", ["a", "c"], ["y"], "add"),
    ], [_f32("x", [2])], [_f32("y", None)])
    optimized = _model([
        _node("Exp", ["x"], ["b"], "exp"),
        _node("Neg", ["b"], ["c"], "neg"),
        _node("Relu", ["x"], ["a0"], "relu"),
        _node("Sigmoid", ["a0"], ["a"], "fused"),
        _node("Add", ["a", "c"], ["y"], "add"),
    ], [_f32("x", [2])], [_f32("y", None)])
    assert _names(_schedule.schedule(optimized, plan)) == ["relu", "fused", "exp", "neg", "add"]


def test_a_reduction_runs_right_after_its_input():
    """A reduction (a bias gradient's sum) reads its input while it is still cached,
    not where the plan wrote it."""
    plan = _model([
        _node("Relu", ["x"], ["a"], "relu"),
        _node("Exp", ["x"], ["b"], "exp"),
        _node("Neg", ["b"], ["c"], "neg"),
        _node("ReduceSum", ["a"], ["r"], "sum", keepdims=0),
        _node("Add", ["r", "c"], ["y"], "add"),
    ], [_f32("x", [2])], [_f32("y", None)])
    assert _names(_schedule.schedule(plan, plan)) == ["relu", "sum", "exp", "neg", "add"]


def test_an_order_that_stays_gives_none():
    model = _model(HOISTED[:1] + HOISTED[3:5], [_f32("x", [3, 3])], [_f32("l", None)])
    assert _schedule.schedule(model, model) is None


def test_a_value_a_subgraph_reads_is_made_before_the_subgraph_runs():
    """A Scan's body may read an outer value without naming it as the Scan's input: its
    producer still runs first, though its only named reader comes later."""
    body = helper.make_graph(
        [_node("Add", ["s_in", "x_t"], ["s1"], "body_add"),
         _node("Add", ["s1", "w2"], ["s_out"], "body_outer"),  # w2: the outer graph's
         _node("Identity", ["s_out"], ["y_t"], "body_out")],
        "body", [_f32("s_in", [3]), _f32("x_t", [3])], [_f32("s_out", [3]), _f32("y_t", [3])])
    model = _model([
        _node("Transpose", ["w"], ["w2"], "transpose", perm=[0]),
        _node("Scan", ["s0", "xs"], ["s_final", "ys"], "scan", num_scan_inputs=1, body=body),
        _node("Neg", ["w2"], ["y"], "neg"),
    ], [_f32("w", [3]), _f32("s0", [3]), _f32("xs", [2, 3])],
        [_f32("s_final", None), _f32("ys", None), _f32("y", None)])
    ordered = _schedule.schedule(model, model)
    names = _names(ordered) if ordered is not None else _names(model)
    assert names.index("transpose") < names.index("scan")
    feed = {"w": np.array([1, 2, 3], np.float32), "s0": np.zeros(3, np.float32),
            "xs": np.ones((2, 3), np.float32)}
    for got, want in zip(plain_session_outputs(ordered or model, feed),
                         plain_session_outputs(model, feed), strict=True):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- a compiled plan
@pytest.fixture(scope="module")
def cnn():
    pytest.importorskip("torch")
    return compiled_conv_step(8)


def test_a_compiled_plan_runs_in_gridfls_order_with_the_same_step(cnn):
    from gridfl import Plan

    data, inputs, want = cnn
    plan = Plan.from_bytes(data)
    options = plan.session.get_session_options()
    assert options.execution_order == ort.ExecutionOrder.PRIORITY_BASED
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert_same_step(plan.execute(*inputs), want)


def test_in_a_compiled_plan_every_copy_runs_just_before_its_reader(cnn):
    """Each weight gradient's input patches (Slice) and every other copy sit right
    before the first node that reads them: nothing but other copies in between. Every
    node's inputs are made before it, and no node is lost or added."""
    from gridfl import Plan

    plan = Plan.from_bytes(cnn[0])
    runtime = plan._runtime_bytes()
    ordered = onnx.load_from_string(plan._ordered_graph(runtime))
    nodes = list(ordered.graph.node)
    made = {i.name for i in ordered.graph.input} | {i.name for i in ordered.graph.initializer}
    at = {}
    for pos, node in enumerate(nodes):
        assert all(x in made for x in node.input if x), node.name
        made.update(node.output)
        for out in node.output:
            at[out] = pos
    readers: dict[int, list[int]] = {}
    for pos, node in enumerate(nodes):
        for x in node.input:
            if x in at:
                readers.setdefault(at[x], []).append(pos)
    moved = [pos for pos, n in enumerate(nodes)
             if n.op_type in _schedule.MOVABLE and pos in readers]
    assert sum(nodes[p].op_type == "Slice" for p in moved) >= 9  # the 3x3 patches, at least
    for pos in moved:
        first = min(readers[pos])
        between = {nodes[p].op_type for p in range(pos + 1, first)}
        assert between <= _schedule.MOVABLE, (nodes[pos].name, between)
    assert sorted(n.name for n in nodes) == sorted(
        n.name for n in onnx.load_from_string(_optimized(runtime)).graph.node)


def _optimized(model: bytes) -> bytes:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(tmp, "o.onnx")
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        with open(so.optimized_model_filepath, "rb") as f:
            return f.read()


@pytest.mark.parametrize("failure", ["the schedule raises", "onnxruntime refuses its graph"])
def test_a_failing_schedule_leaves_the_plan_in_onnxruntimes_order(cnn, monkeypatch, failure):
    """The order is an optimization: whatever goes wrong with it, the plan runs, in
    onnxruntime's own order, with the same step."""
    from gridfl import Plan

    def broken(optimized, plan):
        if failure == "the schedule raises":
            raise ValueError("a bug in the schedule")
        return optimized[: len(optimized) // 2]  # truncated: onnxruntime cannot load it

    monkeypatch.setattr(_schedule, "schedule", broken)
    data, inputs, want = cnn
    plan = Plan.from_bytes(data)
    assert plan.session.get_session_options().execution_order == ort.ExecutionOrder.DEFAULT
    assert_same_step(plan.execute(*inputs), want)
