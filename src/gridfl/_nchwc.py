"""Run a plan's convolutions in onnxruntime's blocked (NCHWc) layout (private to
:mod:`gridfl.plan`).

onnxruntime's fastest CPU convolution keeps channels in blocks the width of the CPU's
vectors (16 floats with AVX-512, 8 with AVX2) and the filter reordered to match. Its
optimizer makes that rewrite only when the filter is a constant. A plan's filters are
inputs (the params a worker trains), so every convolution ran as im2col and a GEMM per
image instead, about 20% slower. When a plan's session is created, :func:`rewrite` makes
the same change on the plan's bytes, with the filter's reorder in the graph (a few
kilobytes moved per step):

* a ``Conv`` (2-D, one group, no dilation) whose filter is a graph input with input and
  output channels that are multiples of the block;
* a ``ConvTranspose`` of stride 1 (a convolution's input gradient) with such a filter, as
  the convolution with the filter transposed and flipped.

The rewritten graph uses onnxruntime's own ``com.microsoft.nchwc`` ops; the plan that is
hosted, stored and sent stays standard ONNX, and the rewrite never leaves the process.
The block is onnxruntime's, found by asking it and checked by running a rewritten
convolution against the plain one (:func:`block_size`), so a plan compiled on one
machine runs in the right layout on another, or as written. Workers have neither torch nor onnx:
the bytes are edited with gridfl's protobuf wire reader and writer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from gridfl._onnx_wire import (
    ATTR_I,
    ATTR_INTS,
    ATTR_NAME,
    ATTR_S,
    ATTR_T,
    ATTR_TYPE,
    FLOAT,
    GRAPH_NODE,
    INT,
    INT64,
    INTS,
    MODEL_GRAPH,
    MODEL_OPSET,
    NODE_ATTRIBUTE,
    NODE_DOMAIN,
    NODE_INPUT,
    NODE_OP_TYPE,
    NODE_OUTPUT,
    STRING,
    TENSOR,
    Node,
    read_node,
)
from gridfl._protobuf import LEN, iter_fields, len_field, varint_field

__all__ = ["block_size", "rewrite"]

DOMAIN = "com.microsoft.nchwc"
_INT64_MIN = -(1 << 63)
_CONV_ATTRS = {"group", "pads", "auto_pad", "strides", "dilations", "kernel_shape"}
_CONV_T_ATTRS = _CONV_ATTRS | {"output_padding"}

# ---------------------------------------------------------------- writing
def _str(f: int, s: str) -> bytes:
    return len_field(f, s.encode())


def _attribute(name: str, value: int | str | Sequence[int] | bytes) -> bytes:
    out = _str(ATTR_NAME, name)
    if isinstance(value, bytes):  # an int64 TensorProto, already encoded
        return out + len_field(ATTR_T, value) + varint_field(ATTR_TYPE, TENSOR)
    if isinstance(value, int):
        return out + varint_field(ATTR_I, value) + varint_field(ATTR_TYPE, INT)
    if isinstance(value, str):
        return out + _str(ATTR_S, value) + varint_field(ATTR_TYPE, STRING)
    return out + b"".join(varint_field(ATTR_INTS, v) for v in value) + varint_field(
        ATTR_TYPE, INTS)


def _node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = "",
          **attrs: int | str | Sequence[int] | bytes) -> bytes:
    body = b"".join(_str(NODE_INPUT, i) for i in inputs)
    body += b"".join(_str(NODE_OUTPUT, o) for o in outputs)
    body += _str(NODE_OP_TYPE, op_type)
    body += b"".join(len_field(NODE_ATTRIBUTE, _attribute(k, v)) for k, v in attrs.items())
    if domain:
        body += _str(NODE_DOMAIN, domain)
    return len_field(GRAPH_NODE, body)


def _int64s(name: str, values: Sequence[int]) -> bytes:
    """A ``Constant`` node holding a 1-D int64 tensor."""
    tensor = varint_field(1, len(values)) + varint_field(2, INT64)
    tensor += b"".join(varint_field(7, v) for v in values)
    return _node("Constant", [], [name], value=tensor)


def _opset(domain: str, version: int) -> bytes:
    return len_field(MODEL_OPSET, _str(1, domain) + varint_field(2, version))


def _value_info(name: str, elem_type: int, dims: Sequence[int]) -> bytes:
    shape = b"".join(len_field(1, varint_field(1, d)) for d in dims)
    tensor = varint_field(1, elem_type) + len_field(2, shape)
    return _str(1, name) + len_field(2, len_field(1, tensor))


# ---------------------------------------------------------------- the block
def _model(nodes: bytes, inputs: Sequence[tuple[str, int, Sequence[int]]],
           outputs: Sequence[tuple[str, int, Sequence[int]]], *domains: str) -> bytes:
    graph = nodes + _str(2, "probe")
    graph += b"".join(len_field(11, _value_info(*i)) for i in inputs)
    graph += b"".join(len_field(12, _value_info(*o)) for o in outputs)
    model = varint_field(1, 8) + _opset("", 17)
    model += b"".join(_opset(d, 1) for d in domains)
    return model + len_field(MODEL_GRAPH, graph)


def _run(model: bytes, feeds: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a probe's failure is an answer, not an error to print
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _reordered_channels() -> int:
    """How many channels ``ReorderInput`` makes of one: the block (it pads to a whole
    block); 1 when the ops are missing."""
    import numpy as np

    nodes = _node("ReorderInput", ["x"], ["r"], DOMAIN, channels_last=0)
    nodes += _node("Shape", ["r"], ["s"])
    model = _model(nodes, [("x", FLOAT, [1, 1, 1, 1])], [("s", INT64, [4])], DOMAIN)
    try:
        shape = _run(model, {"x": np.zeros((1, 1, 1, 1), np.float32)})[0]
    except Exception:  # noqa: BLE001 - a build without the ops: no blocked layout
        return 1
    return int(shape[1])


def _agrees(block: int) -> bool:
    """Whether :func:`rewrite` with ``block`` computes what the graph as written does,
    here: a convolution and an input gradient on random values, through this
    onnxruntime. The filter layout is onnxruntime's internal one; a runtime that lays it
    out differently, or lacks a kernel, fails this and gets no rewrite."""
    import numpy as np

    c, side = 2 * block, 5
    shapes = {"x": [2, c, side, side], "w": [c, c, 3, 3]}
    nodes = _node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    nodes += _node("ConvTranspose", ["x", "w"], ["z"], pads=[1, 1, 1, 1])
    model = _model(nodes, [(n, FLOAT, s) for n, s in shapes.items()],
                   [(o, FLOAT, shapes["x"]) for o in ("y", "z")])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    try:
        rewritten = rewrite(model, shapes, block)
        if rewritten is None:
            return False
        want, got = _run(model, feeds), _run(rewritten, feeds)
    except Exception:  # noqa: BLE001 - whatever the runtime refuses: no rewrite
        return False
    return all(np.allclose(g, w, rtol=1e-4, atol=1e-4) for g, w in zip(got, want, strict=True))


@functools.cache
def block_size() -> int:
    """onnxruntime's NCHWc channel block on this CPU, checked by running a rewritten
    convolution against the plain one (1: no blocked layout, or one that disagrees)::

        >>> block_size() in (1, 4, 8, 16)
        True
    """
    block = _reordered_channels()
    return block if block > 1 and _agrees(block) else 1


# ---------------------------------------------------------------- the rewrite
def _ints(node: Node, name: str, default: list[int]) -> list[int] | None:
    value = node.attrs.get(name, default)
    return value if isinstance(value, list) and all(isinstance(v, int) for v in value) else None


def _blocked_filter(p: str, w: str, co: int, ci: int, kernel: list[int], block: int,
                    flip: bool) -> bytes:
    """The nodes reordering filter ``w`` into onnxruntime's blocked layout, ``[co/B,
    ci/B, kh, kw, ci%B, co%B]``; with ``flip``, ``w`` is ``[ci, co, kh, kw]``, taken
    transposed and flipped (a ``ConvTranspose``'s filter as a convolution's).

    Each Transpose moves one axis (onnxruntime copies whole rows for those, and walks
    element by element for any other order: 4 to 7x slower on a 5x5 filter), with a
    Reshape between them so that its optimizer does not merge them back into one."""
    b, k = block, kernel[0] * kernel[1]
    steps: list[tuple[list[int], list[int]]]  # (shape to view as, then the transpose)
    if flip:  # [ci/B, ci%B, co/B, co%B, K] -> [co/B, ci/B, K, ci%B, co%B], K reversed
        steps = [([ci // b, b, co // b, b, k], [0, 2, 3, 4, 1]),
                 ([ci // b * co // b, b, k * b], [0, 2, 1]),
                 ([ci // b, co // b, k * b * b], [1, 0, 2])]
    else:  # [co/B, co%B, ci/B, ci%B, K] -> [co/B, ci/B, K, ci%B, co%B]
        steps = [([co // b, b, ci // b, b, k], [0, 2, 3, 4, 1]),
                 ([co // b * ci // b, b, k, b], [0, 2, 1, 3])]
    out = b""
    for j, (view, perm) in enumerate(steps):
        out += _int64s(f"{p}/view{j}", view)
        out += _node("Reshape", [w, f"{p}/view{j}"], [f"{p}/w_view{j}"])
        out += _node("Transpose", [f"{p}/w_view{j}"], [f"{p}/w_moved{j}"], perm=perm)
        w = f"{p}/w_moved{j}"
    if flip:  # reverse the kernel's positions: whole ci%B x co%B blocks
        out += _int64s(f"{p}/flip_view", [co // b, ci // b, k, b * b])
        out += _node("Reshape", [w, f"{p}/flip_view"], [f"{p}/w_kernel"])
        out += _int64s(f"{p}/starts", [-1]) + _int64s(f"{p}/ends", [_INT64_MIN])
        out += _int64s(f"{p}/axes", [2]) + _int64s(f"{p}/steps", [-1])
        out += _node("Slice", [f"{p}/w_kernel", f"{p}/starts", f"{p}/ends", f"{p}/axes",
                               f"{p}/steps"], [f"{p}/w_flipped"])
        w = f"{p}/w_flipped"
    out += _int64s(f"{p}/shape", [co, ci, *kernel])
    return out + _node("Reshape", [w, f"{p}/shape"], [f"{p}/w_blocked"])


def _blocked_conv(k: int, x: str, w: str, bias: list[str], y: str, co: int, ci: int,
                  kernel: list[int], pads: list[int], strides: list[int], block: int,
                  flip: bool) -> bytes:
    """The nodes of one NCHWc convolution of ``x`` by filter ``w`` (``[co, ci, *kernel]``
    after the optional transpose-and-flip of a ``ConvTranspose``'s filter)."""
    p = f"gridfl.nchwc/{k}"
    out = _blocked_filter(p, w, co, ci, kernel, block, flip)
    out += _node("ReorderInput", [x], [f"{p}/x"], DOMAIN, channels_last=0)
    out += _node("Conv", [f"{p}/x", f"{p}/w_blocked", *bias], [f"{p}/y"], DOMAIN,
                 group=1, kernel_shape=kernel, pads=pads, strides=strides)
    out += _node("ReorderOutput", [f"{p}/y"], [y], DOMAIN, channels_last=0, channels=co)
    return out


def _convert(node: Node, k: int, shapes: Mapping[str, Sequence[int | None]],
             block: int) -> bytes | None:
    """The NCHWc nodes for ``node``, or None when it is left as it is."""
    transposed = node.op_type == "ConvTranspose"
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose"):
        return None
    if not set(node.attrs) <= (_CONV_T_ATTRS if transposed else _CONV_ATTRS):
        return None
    if len(node.inputs) not in (2, 3) or len(node.outputs) != 1 or "" in node.inputs:
        return None
    shape = shapes.get(node.inputs[1])
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    w0, w1, kh, kw = (int(d) for d in shape if d is not None)
    kernel = [kh, kw]
    pads = _ints(node, "pads", [0, 0, 0, 0])
    strides = _ints(node, "strides", [1, 1])
    if (
        node.attrs.get("group", 1) != 1
        or node.attrs.get("auto_pad", "NOTSET") != "NOTSET"
        or _ints(node, "dilations", [1, 1]) != [1, 1]
        or _ints(node, "kernel_shape", kernel) != kernel
        or pads is None or len(pads) != 4 or min(pads) < 0
        or strides is None or len(strides) != 2 or min(strides) < 1
        or w0 % block or w1 % block
    ):
        return None
    if not transposed:
        return _blocked_conv(k, node.inputs[0], node.inputs[1], node.inputs[2:],
                             node.outputs[0], w0, w1, kernel, pads, strides, block, False)
    # stride 1: the input gradient is the convolution with the flipped filter, padded
    # by kernel - 1 - pad on each side
    output_padding = _ints(node, "output_padding", [0, 0])
    if strides != [1, 1] or output_padding is None or any(output_padding):
        return None
    full = [kh - 1, kw - 1, kh - 1, kw - 1]
    if any(p > f for p, f in zip(pads, full, strict=True)):
        return None
    return _blocked_conv(k, node.inputs[0], node.inputs[1], node.inputs[2:],
                         node.outputs[0], w1, w0, kernel,
                         [f - p for p, f in zip(pads, full, strict=True)], [1, 1], block,
                         True)


def rewrite(model: bytes, shapes: Mapping[str, Sequence[int | None]],
            block: int | None = None) -> bytes | None:
    """``model`` with its eligible convolutions in the blocked layout, or None when it
    has none (or this CPU has no blocked layout). ``shapes``: graph input name -> shape
    (the filters' shapes are read from it); ``block``: :func:`block_size` by default,
    probed only for a graph that has a convolution. Nested graphs (a ``Scan``'s body)
    are left as they are."""
    graph_at = None
    parts: list[bytes] = []
    prev = 0
    for f, wt, a, b, _ in iter_fields(model, 0, len(model)):
        if f == MODEL_OPSET and wt == LEN and DOMAIN.encode() in model[a:b]:
            return None  # already rewritten
        if f == MODEL_GRAPH and wt == LEN:
            graph_at = (len(parts), a, b)
        parts.append(model[prev:b])
        prev = b
    if graph_at is None:
        return None
    index, start, stop = graph_at
    fields: list[tuple[bytes, Node | None]] = []  # the graph's fields, nodes read
    prev = start
    for f, wt, a, b, _ in iter_fields(model, start, stop):
        node = read_node(model, a, b) if f == GRAPH_NODE and wt == LEN else None
        fields.append((model[prev:b], node))
        prev = b
    if not any(n is not None and n.op_type in ("Conv", "ConvTranspose") for _, n in fields):
        return None
    block = block_size() if block is None else block
    if block <= 1:
        return None
    graph: list[bytes] = []
    converted = 0
    for raw, node in fields:
        new = None if node is None else _convert(node, converted, shapes, block)
        graph.append(raw if new is None else new)
        converted += new is not None
    if not converted:
        return None
    parts[index] = len_field(MODEL_GRAPH, b"".join(graph))
    return b"".join(parts) + _opset(DOMAIN, 1)
