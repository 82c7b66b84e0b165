"""Small gridfl plans built directly with ``onnx.helper`` (no torch), for SDK tests.

``linear_sgd_plan``: linear regression with MSE, one SGD step (optionally with momentum,
so the plan has ``optimizer_state`` inputs and outputs). Signature in PyGrid order:
``(X, y, batch_size, lr, W, b[, vW, vb]) -> (loss, mae, W', b'[, vW', vb'])``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper


def linear_sgd_plan(features: int = 3, *, momentum: float | None = None) -> bytes:
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
