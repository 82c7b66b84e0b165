"""ONNX models' nodes read from their protobuf bytes (private to the runtime rewrites of
:mod:`gridfl.plan`): workers have neither onnx nor torch, so ``gridfl._nchwc`` and
``gridfl._schedule`` read a plan with gridfl's protobuf wire reader."""

from __future__ import annotations

from dataclasses import dataclass, field

from gridfl._protobuf import LEN, VARINT, iter_fields, read_varint

__all__ = ["Node", "Other", "graph_parts", "read_node"]

# ONNX field numbers (onnx.proto)
MODEL_GRAPH, MODEL_OPSET = 7, 8
GRAPH_NODE = 1
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 1, 2, 3, 4, 5, 7
ATTR_NAME, ATTR_I, ATTR_S, ATTR_T, ATTR_G, ATTR_INTS, ATTR_GRAPHS, ATTR_TYPE = (
    1, 3, 4, 5, 6, 8, 11, 20)
INT, STRING, TENSOR, INTS = 2, 3, 4, 7  # AttributeProto.AttributeType
FLOAT, INT64 = 1, 7  # TensorProto.DataType


def _signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


class Other:
    """An attribute of a kind the reader does not decode (a tensor, a graph, floats)."""


@dataclass
class Node:
    op_type: str = ""
    domain: str = ""
    name: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    #: int, string and ints attributes by name; any other kind is an :class:`Other`
    attrs: dict[str, object] = field(default_factory=dict)
    #: the names its subgraphs (a ``Scan``'s body) read, outer values they use without
    #: naming them as the node's inputs among them
    subgraph_reads: list[str] = field(default_factory=list)


def _read_attribute(buf: bytes, start: int, stop: int, reads: list[str]) -> tuple[str, object]:
    name, ints = "", []
    value: object = None
    for f, wt, a, b, v in iter_fields(buf, start, stop):
        if f == ATTR_NAME and wt == LEN:
            name = bytes(buf[a:b]).decode()
        elif f == ATTR_I and wt == VARINT:
            value = _signed(v)
        elif f == ATTR_S and wt == LEN:
            value = bytes(buf[a:b]).decode(errors="replace")
        elif f == ATTR_INTS and wt == VARINT:
            ints.append(_signed(v))
        elif f == ATTR_INTS and wt == LEN:  # packed
            pos = a
            while pos < b:
                n, pos = read_varint(buf, pos, b)
                ints.append(_signed(n))
        elif f != ATTR_TYPE:
            value = Other()
            if f in (ATTR_G, ATTR_GRAPHS) and wt == LEN:
                for gf, gwt, ga, gb, _ in iter_fields(buf, a, b):
                    if gf == GRAPH_NODE and gwt == LEN:
                        inner = read_node(buf, ga, gb)
                        reads.extend(inner.inputs + inner.subgraph_reads)
    return name, ints if value is None and ints else value


def read_node(buf: bytes, start: int, stop: int) -> Node:
    """The ``NodeProto`` in ``buf[start:stop]``."""
    node = Node()
    for f, wt, a, b, _ in iter_fields(buf, start, stop):
        if wt != LEN:
            continue
        if f == NODE_INPUT:
            node.inputs.append(bytes(buf[a:b]).decode())
        elif f == NODE_OUTPUT:
            node.outputs.append(bytes(buf[a:b]).decode())
        elif f == NODE_NAME:
            node.name = bytes(buf[a:b]).decode()
        elif f == NODE_OP_TYPE:
            node.op_type = bytes(buf[a:b]).decode()
        elif f == NODE_DOMAIN:
            node.domain = bytes(buf[a:b]).decode()
        elif f == NODE_ATTRIBUTE:
            name, value = _read_attribute(buf, a, b, node.subgraph_reads)
            node.attrs[name] = value
    return node


def graph_parts(model: bytes) -> tuple[bytes, int, int, bytes] | None:
    """``model`` split around its graph: the bytes before the graph field, the span of
    the graph's payload, and the bytes after the field; None if it has no graph."""
    prev = 0
    for f, wt, a, b, _ in iter_fields(model, 0, len(model)):
        if f == MODEL_GRAPH and wt == LEN:
            return model[:prev], a, b, model[b:]
        prev = b
    return None
