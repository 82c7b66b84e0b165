"""Graph rewrites on the exported plan that onnxruntime does not do itself.

SGD's update of a weight matrix, ``new_w = w - lr * (a @ b)``, exports as a MatMul, a Mul
by the learning rate and a Sub: three passes over an array the size of the weights, two
of them only reading and writing memory. As one ``Gemm(lr * a, b, C=w, alpha=-1,
beta=1)`` the update runs inside the matrix product, and the Mul scales ``a``, whose
rows are the batch, instead of the product. For the McMahan 2NN the Mul and the Sub were
a third of a training step's kernel time (benchmarks/bench_step.py).
"""

from __future__ import annotations

import onnx
from onnx import helper


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Every value's shape as far as ONNX shape inference knows it (None: unknown dim)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, list[int | str | None]] = {}
    graph = inferred.graph
    for v in (*graph.input, *graph.value_info, *graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in t.shape.dim
            ]
    for init in graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def fuse_sgd_updates(model: onnx.ModelProto) -> int:  # noqa: C901 - one pattern, every guard
    """Rewrite ``Sub(w, Mul(s, MatMul(a, b)))`` (``s`` a scalar, ``w`` and the product
    2-D of the same static shape, the Mul and MatMul used nowhere else) into
    ``Gemm(Mul(s, a), b, w, alpha=-1, beta=1)``, in place; returns how many.

        >>> from onnx import TensorProto, helper
        >>> def f32(name, shape):
        ...     return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        >>> graph = helper.make_graph(
        ...     [helper.make_node("MatMul", ["a", "b"], ["grad"]),
        ...      helper.make_node("Mul", ["lr", "grad"], ["step"]),
        ...      helper.make_node("Sub", ["w", "step"], ["new_w"])],
        ...     "sgd", [f32("w", [3, 4]), f32("lr", []), f32("a", [3, 5]), f32("b", [5, 4])],
        ...     [f32("new_w", [3, 4])])
        >>> model = helper.make_model(graph)
        >>> fuse_sgd_updates(model)
        1
        >>> [n.op_type for n in model.graph.node]
        ['Mul', 'Gemm']
    """
    graph = model.graph
    shapes = _shapes(model)
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}  # value -> node index

    def made_by(name: str, op_type: str) -> int | None:
        k = producer.get(name)
        return k if k is not None and nodes[k].op_type == op_type else None
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in graph.output:
        uses[o.name] = uses.get(o.name, 0) + 1

    def only_use(name: str) -> bool:
        return uses.get(name) == 1

    rewrites: dict[int, list[onnx.NodeProto]] = {}  # Sub's index -> its replacement
    dropped: set[int] = set()
    for k, sub in enumerate(nodes):
        if sub.op_type != "Sub" or sub.domain not in ("", "ai.onnx"):
            continue
        w, scaled = sub.input
        k_mul = made_by(scaled, "Mul")
        if k_mul is None or not only_use(scaled):
            continue
        mul = nodes[k_mul]
        found = (made_by(i, "MatMul") for i in mul.input)
        k_mm = next((j for j in found if j is not None), None)
        if k_mm is None or not only_use(nodes[k_mm].output[0]):
            continue
        matmul = nodes[k_mm]
        scale = mul.input[1] if mul.input[0] == matmul.output[0] else mul.input[0]
        a, b = matmul.input
        if (
            shapes.get(scale) != []
            or len(shapes.get(a) or ()) != 2
            or len(shapes.get(b) or ()) != 2
            or not _static(shapes.get(w))
            or shapes.get(w) != shapes.get(matmul.output[0])
        ):
            continue
        # a 2-D Transpose feeding the product becomes Gemm's transA / transB
        trans = []
        operands = []
        for x in (a, b):
            k_t = made_by(x, "Transpose")
            if k_t is not None and only_use(x) and _perm(nodes[k_t]) in (None, [1, 0]):
                operands.append(nodes[k_t].input[0])
                trans.append(1)
                dropped.add(k_t)
            else:
                operands.append(x)
                trans.append(0)
        base = sub.name or sub.output[0]
        scaled_a = f"{base}/lr_a"
        rewrites[k] = [
            helper.make_node("Mul", [scale, operands[0]], [scaled_a], name=f"{base}/scale"),
            helper.make_node(
                "Gemm", [scaled_a, operands[1], w], list(sub.output), name=f"{base}/sgd_gemm",
                alpha=-1.0, beta=1.0, transA=trans[0], transB=trans[1],
            ),
        ]
        dropped.update((k_mul, k_mm))
    if not rewrites:
        return 0
    removed = {o for k in dropped for o in nodes[k].output}
    del graph.node[:]
    for k, n in enumerate(nodes):
        if k not in dropped:
            graph.node.extend(rewrites.get(k, [n]))
    kept = [v for v in graph.value_info if v.name not in removed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return len(rewrites)
