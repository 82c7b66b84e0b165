"""A plan's convolutions run in onnxruntime's blocked layout, with the same results.

Every case builds a small ONNX graph, runs it as written and as :func:`rewrite` leaves it
on this machine's block, and compares the outputs; which nodes were rewritten is read
back from the rewritten bytes with the onnx library (an independent parser)."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from gridfl import _nchwc
from tests.builders import assert_same_step, compiled_conv_step, plain_session_outputs

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

BLOCK = _nchwc.block_size()


def test_the_block_is_found_on_x86():
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert BLOCK in (8, 16)  # AVX2 or AVX-512
    else:
        assert BLOCK >= 1


@pytest.mark.skipif(BLOCK == 1, reason="this CPU has no blocked layout in onnxruntime")
def test_a_block_the_runtime_does_not_use_fails_the_probe():
    """The probe runs a rewritten convolution against the plain one: another block's
    filter layout computes something else (or is refused), so it is never used."""
    for other in {4, 8, 16} - {BLOCK}:
        assert _nchwc._agrees(other) is False
    assert _nchwc._agrees(BLOCK) is True


def _model(node, shapes: dict[str, list[int]], out_shape=None) -> bytes:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _run(model: bytes, feeds):
    return plain_session_outputs(model, feeds)[0]


def _feeds(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


B = max(BLOCK, 8)
REWRITTEN = {
    "conv": (helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[2, 2, 2, 2],
                              kernel_shape=[5, 5]),
             {"x": [3, B, 9, 9], "w": [2 * B, B, 5, 5], "b": [2 * B]}),
    "no bias, stride 2, uneven pads": (
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 1], strides=[2, 2]),
        {"x": [2, 2 * B, 11, 10], "w": [B, 2 * B, 3, 3]}),
    "no attributes": (helper.make_node("Conv", ["x", "w"], ["y"]),
                      {"x": [2, B, 6, 6], "w": [B, B, 3, 3]}),
    "input gradient": (
        helper.make_node("ConvTranspose", ["dy", "w"], ["y"], pads=[2, 2, 2, 2],
                         kernel_shape=[5, 5], strides=[1, 1], output_padding=[0, 0],
                         dilations=[1, 1], group=1),
        {"dy": [3, 2 * B, 7, 7], "w": [2 * B, B, 5, 5]}),
    "3x2 filter": (helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 1, 1]),
                   {"x": [2, B, 7, 6], "w": [2 * B, B, 3, 2]}),
    "input gradient, 3x2 filter": (
        helper.make_node("ConvTranspose", ["dy", "w"], ["y"]),
        {"dy": [2, 2 * B, 6, 5], "w": [2 * B, B, 3, 2]}),
    "input gradient, uneven pads, bias": (
        helper.make_node("ConvTranspose", ["dy", "w", "b"], ["y"], pads=[0, 1, 2, 0]),
        {"dy": [2, B, 8, 6], "w": [B, 2 * B, 3, 3], "b": [2 * B]}),
}
LEFT_ALONE = {
    "two groups": (helper.make_node("Conv", ["x", "w"], ["y"], group=2),
                   {"x": [2, 2 * B, 6, 6], "w": [2 * B, B, 3, 3]}),
    "dilated": (helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2, 2]),
                {"x": [2, B, 9, 9], "w": [B, B, 3, 3]}),
    "channels not whole blocks": (helper.make_node("Conv", ["x", "w"], ["y"]),
                                  {"x": [2, 3, 6, 6], "w": [B, 3, 3, 3]}),
    "same padding": (helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER"),
                     {"x": [2, B, 6, 6], "w": [B, B, 3, 3]}),
    "strided input gradient": (
        helper.make_node("ConvTranspose", ["dy", "w"], ["y"], strides=[2, 2]),
        {"dy": [2, B, 5, 5], "w": [B, B, 3, 3]}),
    "input gradient with output padding": (
        helper.make_node("ConvTranspose", ["dy", "w"], ["y"], output_padding=[1, 1],
                         strides=[1, 1]),
        {"dy": [2, B, 5, 5], "w": [B, B, 3, 3]}),
    "1-D": (helper.make_node("Conv", ["x", "w"], ["y"]), {"x": [2, B, 9], "w": [B, B, 3]}),
}


@pytest.mark.skipif(BLOCK == 1, reason="this CPU has no blocked layout in onnxruntime")
@pytest.mark.parametrize("case", list(REWRITTEN))
def test_an_eligible_convolution_is_rewritten_and_computes_the_same(case):
    node, shapes = REWRITTEN[case]
    model = _model(node, shapes)
    rewritten = _nchwc.rewrite(model, shapes)
    assert rewritten is not None
    parsed = onnx.load_from_string(rewritten)
    ops = [(n.domain, n.op_type) for n in parsed.graph.node]
    assert (_nchwc.DOMAIN, "Conv") in ops and ("", node.op_type) not in ops, ops
    assert {(o.domain, o.version) for o in parsed.opset_import} == {("", 18), (_nchwc.DOMAIN, 1)}
    feeds = _feeds(shapes)
    want = _run(model, feeds)
    got = _run(rewritten, feeds)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("case", list(LEFT_ALONE))
def test_other_convolutions_are_left_as_they_are(case):
    node, shapes = LEFT_ALONE[case]
    assert _nchwc.rewrite(_model(node, shapes), shapes, block=B) is None


def test_a_filter_that_is_not_a_graph_input_is_left_alone():
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    shapes = {"x": [2, 8, 6, 6], "w": [8, 8, 3, 3]}
    assert _nchwc.rewrite(_model(node, shapes), {"x": shapes["x"]}, block=8) is None
    assert _nchwc.rewrite(_model(node, shapes), {"x": shapes["x"], "w": [None, 8, 3, 3]},
                          block=8) is None


def test_no_blocked_layout_means_no_rewrite():
    node, shapes = REWRITTEN["conv"]
    assert _nchwc.rewrite(_model(node, shapes), shapes, block=1) is None


@pytest.mark.skipif(BLOCK == 1, reason="this CPU has no blocked layout in onnxruntime")
def test_only_the_eligible_nodes_change_and_the_rest_of_the_model_is_kept():
    """Two convolutions and a ReLU between them, metadata and a doc string: the
    eligible convolution is rewritten, the ineligible one and everything else kept."""
    shapes = {"x": [2, B, 8, 8], "w1": [B, B, 3, 3], "w2": [B, B // 2, 3, 3]}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], group=2)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              doc_string="kept")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"gridfl.kind": "evaluation"})
    data = model.SerializeToString()
    rewritten = _nchwc.rewrite(data, shapes)
    assert rewritten is not None
    parsed = onnx.load_from_string(rewritten)
    assert [(n.domain, n.op_type) for n in parsed.graph.node][-2:] == [("", "Relu"), ("", "Conv")]
    assert parsed.graph.node[-1] == nodes[-1]
    assert parsed.graph.doc_string == "kept"
    assert {p.key: p.value for p in parsed.metadata_props} == {"gridfl.kind": "evaluation"}
    assert list(parsed.graph.input) == list(model.graph.input)
    assert _nchwc.rewrite(rewritten, shapes) is None  # once is enough
    feeds = _feeds(shapes, seed=1)
    np.testing.assert_allclose(_run(rewritten, feeds), _run(data, feeds), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cnn():
    pytest.importorskip("torch")
    return compiled_conv_step(B)


@pytest.mark.skipif(BLOCK == 1, reason="this CPU has no blocked layout in onnxruntime")
def test_a_compiled_plan_runs_its_convolutions_blocked_with_the_same_step(cnn):
    """A compiled CNN's session runs the rewritten graph (forward convolution and input
    gradient), and a training step gives what the plan as written gives."""
    from gridfl import Plan

    data, inputs, want = cnn
    plan = Plan.from_bytes(data)
    runtime = onnx.load_from_string(plan._runtime_bytes())
    ops = [(n.domain, n.op_type) for n in runtime.graph.node]
    assert ops.count((_nchwc.DOMAIN, "Conv")) == 2, ops  # the second layer and its input grad
    assert_same_step(plan.execute(*inputs), want)


@pytest.mark.parametrize("failure", ["the rewrite raises", "onnxruntime refuses its graph"])
def test_a_failing_rewrite_leaves_the_plan_running_as_written(cnn, monkeypatch, failure):
    """The blocked layout is an optimization: whatever goes wrong with it, the plan
    loads and runs its graph as written."""
    from gridfl import Plan

    def broken(model, shapes, block=None):
        if failure == "the rewrite raises":
            raise ValueError("a bug in the rewrite")
        return model[: len(model) // 2]  # truncated: onnxruntime cannot load it

    monkeypatch.setattr(_nchwc, "rewrite", broken)
    data, inputs, want = cnn
    plan = Plan.from_bytes(data)
    assert_same_step(plan.execute(*inputs), want)
