"""The order a plan's nodes run in (private to :mod:`gridfl.plan`).

onnxruntime runs a graph's nodes one at a time in an order of its own: a depth-first
walk back from the graph's outputs. For a training step that walk computes a layer's
weight gradient as soon as the layer's output gradient exists, and its input gradient
only afterwards, when the weight gradient's copies of the input have pushed the output
gradient out of the cache. Its other order, by node index, keeps the step's own order
(the exporter's, which is autograd's) but runs a node fused by the optimizer (a new,
higher index) only when nothing else is ready, so work that needs only forward values,
such as the input patches of a weight gradient, moves into the forward pass: tens of
megabytes written there and read back cold in the backward pass.

:func:`schedule` orders the optimized graph for the index-ordered executor:

* nodes in the step's own order (the plan's node order), except that a node the
  optimizer made, and a reduction (a bias gradient's ``ReduceSum``), go as early as
  their inputs allow: a reduction reads a large tensor for a small result, best while
  the tensor is in the cache;
* then every node that only moves, selects or compares data (``Transpose``, ``Slice``,
  ``Pad``, ``Reshape``, ``Cast``, ...) just before its first consumer, so each copy is
  read while it is still in the cache.

The result is the same graph in another order: the same kernels compute the same values.
Workers have neither torch nor onnx: the bytes are read and written with gridfl's
protobuf wire reader and writer.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from gridfl._onnx_wire import GRAPH_NODE, MODEL_GRAPH, graph_parts, read_node
from gridfl._protobuf import LEN, iter_fields, len_field

__all__ = ["MOVABLE", "REDUCING", "schedule"]

#: Ops that only move, select or compare data: run just before their first consumer.
MOVABLE = frozenset({
    "Cast", "Concat", "Equal", "Expand", "Flatten", "Gather", "Greater", "Identity",
    "Less", "Pad", "Reshape", "Shape", "Slice", "Split", "Squeeze", "Transpose",
    "Unsqueeze",
})
#: Ops whose output is much smaller than their input: run as soon as the input exists.
REDUCING = frozenset({
    "ArgMax", "ArgMin", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
})


@dataclass
class _Node:
    raw: bytes  # the node's whole field, tag included
    name: str
    op_type: str
    inputs: list[str]  # what its subgraphs read included
    outputs: list[str]


def _nodes(model: bytes, start: int, stop: int) -> tuple[list[_Node], list[bytes]]:
    """The graph's nodes in ``model[start:stop]``, and its other fields in their order."""
    nodes, others = [], []
    prev = start
    for f, wt, a, b, _ in iter_fields(model, start, stop):
        raw = model[prev:b]
        prev = b
        if f == GRAPH_NODE and wt == LEN:
            node = read_node(model, a, b)
            nodes.append(_Node(raw, node.name, node.op_type,
                               node.inputs + node.subgraph_reads, node.outputs))
        else:
            others.append(raw)
    return nodes, others


def _node_names(model: bytes) -> list[str]:
    parts = graph_parts(model)
    return [] if parts is None else [n.name for n in _nodes(model, parts[1], parts[2])[0]]


def _edges(nodes: Sequence[_Node]) -> tuple[list[list[int]], list[list[int]]]:
    producer = {out: i for i, n in enumerate(nodes) for out in n.outputs if out}
    inputs = [sorted({producer[x] for x in n.inputs if x in producer}) for n in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, deps in enumerate(inputs):
        for j in deps:
            users[j].append(i)
    return inputs, users


def _step_order(nodes: Sequence[_Node], inputs: list[list[int]], users: list[list[int]],
                position: dict[str, int]) -> list[int]:
    """A topological order that follows ``position`` (the plan's node order); a node
    not in it, or one that reduces, goes right after the last of its inputs."""
    key: list[float] = []
    for i, n in enumerate(nodes):  # the optimized graph is stored in a topological order
        if n.name in position and n.op_type not in REDUCING:
            key.append(position[n.name])
        else:
            key.append(max((key[j] for j in inputs[i]), default=-1) + 0.5)
    waiting = [len(d) for d in inputs]
    ready = [(key[i], i) for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (key[u], u))
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return order


def _sink(nodes: Sequence[_Node], order: list[int], users: list[list[int]]) -> list[int]:
    """``order`` with every movable node moved to just before its first consumer."""
    rank = {v: r for r, v in enumerate(order)}
    anchor: dict[int, int] = {}  # movable node -> the fixed node it runs before
    for v in reversed(order):
        if nodes[v].op_type in MOVABLE and users[v]:
            anchor[v] = min((anchor.get(u, u) for u in users[v]), key=rank.__getitem__)
    before: dict[int, list[int]] = {}
    for v in order:  # in order, so each group keeps its own dependencies
        if v in anchor:
            before.setdefault(anchor[v], []).append(v)
    out: list[int] = []
    for v in order:
        if v not in anchor:
            out.extend(before.get(v, ()))
            out.append(v)
    return out


def schedule(optimized: bytes, plan: bytes) -> bytes | None:
    """``optimized`` (onnxruntime's optimized graph of ``plan``) with its nodes in the
    order above, for ``ExecutionOrder.PRIORITY_BASED``; None if the order is the same.
    ``plan``: the graph onnxruntime optimized (its node order is the step's)."""
    parts = graph_parts(optimized)
    if parts is None:
        return None
    head, start, stop, tail = parts
    nodes, others = _nodes(optimized, start, stop)
    position = {name: i for i, name in enumerate(_node_names(plan)) if name}
    inputs, users = _edges(nodes)
    order = _sink(nodes, _step_order(nodes, inputs, users, position), users)
    if order == list(range(len(nodes))):
        return None
    graph = b"".join(nodes[i].raw for i in order) + b"".join(others)
    return head + len_field(MODEL_GRAPH, graph) + tail
