"""The SGD-update fusion (gridfl/compiler/fuse.py): where it applies the plan computes
the same step with one Gemm per weight matrix; where it does not apply the graph is left
exactly as exported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gridfl.compiler.fuse import fuse_sgd_updates

torch = pytest.importorskip("torch")


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _update_graph(*, w_shape=(4, 3), scale_shape=(), mul_used_twice=False):
    """``new_w = w - s * (transpose(g) @ x)``, as the exporter writes SGD's update."""
    nodes = [
        helper.make_node("Transpose", ["g"], ["gt"], perm=[1, 0]),
        helper.make_node("MatMul", ["gt", "x"], ["grad"]),
        helper.make_node("Mul", ["s", "grad"], ["step"]),
        helper.make_node("Sub", ["w", "step"], ["new_w"]),
    ]
    outputs = [helper.make_tensor_value_info("new_w", TensorProto.FLOAT, [4, 3])]
    if mul_used_twice:
        nodes.append(helper.make_node("Identity", ["step"], ["step_out"]))
        outputs.append(helper.make_tensor_value_info("step_out", TensorProto.FLOAT, [4, 3]))
    graph = helper.make_graph(
        nodes,
        "update",
        [
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, list(scale_shape)),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w_shape)),
        ],
        outputs,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _feeds(w_shape=(4, 3), scale_shape=()):
    rng = np.random.default_rng(0)
    return {
        "g": rng.standard_normal((2, 4)).astype(np.float32),
        "x": rng.standard_normal((2, 3)).astype(np.float32),
        "s": np.full(scale_shape, 0.1, dtype=np.float32),
        "w": rng.standard_normal(w_shape).astype(np.float32),
    }


def test_update_becomes_one_gemm_with_the_same_result():
    model = _update_graph()
    before = _run(model, _feeds())
    assert fuse_sgd_updates(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Mul", "Gemm"]  # the Transpose went into transA, the Sub into beta=1
    gemm = model.graph.node[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs == {"alpha": -1.0, "beta": 1.0, "transA": 1, "transB": 0}
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(_run(model, _feeds())[0], before[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "case",
    [
        {"scale_shape": (1, 3)},  # not a scalar: Mul(s, a) would not mean the same
        {"w_shape": (1, 3)},  # w broadcasts against the product: not a weight update
        {"mul_used_twice": True},  # the scaled gradient is also an output
    ],
)
def test_left_alone_outside_the_pattern(case):
    feeds_kw = {k: v for k, v in case.items() if k in ("w_shape", "scale_shape")}
    model = _update_graph(**case)
    exported = model.SerializeToString()
    before = _run(model, _feeds(**feeds_kw))
    assert fuse_sgd_updates(model) == 0
    assert model.SerializeToString() == exported
    for a, b in zip(_run(model, _feeds(**feeds_kw)), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_2nn_plan_fused_and_unfused_agree():
    """The 2NN's three weight updates fuse; the step's outputs (loss, accuracy, new
    params) match the unfused export's to float32 rounding."""
    from gridfl.compiler import SGD, compile_training_plan
    from gridfl.compiler import export as export_mod
    from gridfl.demo.models import build_model

    calls = []
    real = export_mod.fuse_sgd_updates

    def recording(model):
        calls.append(onnx.ModelProto.FromString(model.SerializeToString()))  # unfused copy
        return real(model)

    rng = np.random.default_rng(0)
    x = rng.random((10, 784), dtype=np.float32)
    y = rng.integers(0, 10, 10)
    model = build_model("2nn", seed=0)
    try:
        export_mod.fuse_sgd_updates = recording
        plan = compile_training_plan(model, loss="cross_entropy", optimizer=SGD(lr=0.1),
                                     example_data=x, example_target=y)
    finally:
        export_mod.fuse_sgd_updates = real
    (unfused,) = calls
    fused = onnx.ModelProto.FromString(plan.to_bytes())
    gemms = [n for n in fused.graph.node if n.name.endswith("/sgd_gemm")]
    assert len(gemms) == 3  # the three weight matrices; the biases keep Mul and Sub

    params = [p.detach().numpy() for p in model.parameters()]
    feeds = {"X": x, "y": y.astype(np.int64), "batch_size": np.array(10, np.float32),
             "lr": np.array(0.1, np.float32)}
    names = [i.name for i in unfused.graph.input]
    types = {i.name: i.type.tensor_type.elem_type for i in unfused.graph.input}
    feeds = {k: v.astype(helper.tensor_dtype_to_np_dtype(types[k])) for k, v in feeds.items()}
    feeds.update({f"param_{i}": p for i, p in enumerate(params)})
    assert sorted(feeds) == sorted(names)
    for a, b in zip(_run(fused, feeds), _run(unfused, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_momentum_plan_is_not_rewritten():
    """SGD with momentum updates with the velocity, not a product: nothing to fuse, and
    the plan still matches torch (the compiler verifies it)."""
    from gridfl.compiler import SGD, compile_training_plan
    from gridfl.demo.models import build_model

    rng = np.random.default_rng(0)
    plan = compile_training_plan(
        build_model("2nn", seed=0), loss="cross_entropy", optimizer=SGD(lr=0.1, momentum=0.9),
        example_data=rng.random((10, 784), dtype=np.float32),
        example_target=rng.integers(0, 10, 10),
    )
    graph = onnx.ModelProto.FromString(plan.to_bytes()).graph
    assert not [n for n in graph.node if n.name.endswith("/sgd_gemm")]
