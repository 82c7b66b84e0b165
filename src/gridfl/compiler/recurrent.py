"""LSTM and GRU layers as one ONNX ``Scan`` forward and one backward, not unrolled.

torch decomposes ``nn.LSTM`` into its time steps, so a sequence of 20 traced into ~1,100
ONNX nodes and took about a minute to trace and export, growing with the sequence length.
Here each layer and direction is:

* the input projection ``x @ W_ih.T + b_ih + b_hh`` for all steps at once (ordinary ops,
  differentiated by autograd);
* ``gridfl::lstm_scan`` / ``gridfl::gru_scan``: the recurrence, exported as ONE ``Scan``
  whose body is a step;
* its backward, ``gridfl::lstm_scan_backward`` / ``gridfl::gru_scan_backward``: one
  reversed ``Scan`` giving the gradient of the gates' pre-activations; the weight
  gradient of ``W_hh`` is one ``MatMul`` over all steps.

The graph size does not depend on the sequence length. During export the two ops are
placeholders in the domain ``gridfl.pending`` (the exporter cannot emit a ``Scan``, whose
outputs are variadic); :func:`lower_scans` replaces them with the ``Scan`` nodes.
Projections (``proj_size``) and dropout between layers in training mode are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
import torch
from onnx import TensorProto, helper
from onnx.defs import OpSchema
from onnxscript import values
from torch._C import DispatchKey

from gridfl._exceptions import CompileError

__all__ = ["PENDING_DOMAIN", "lower_scans", "rnns_as_scans", "translation_table"]

aten = torch.ops.aten
PENDING_DOMAIN = "gridfl.pending"


# ---------------------------------------------------------------- eager kernels
def _split_gates(a: torch.Tensor):
    i, f, g, o = a.chunk(4, dim=-1)
    return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)


@torch.library.custom_op("gridfl::lstm_scan", mutates_args=())
def lstm_scan(
    xw: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``xw`` (T, N, 4H): input projections; returns every h, every c and the gates."""
    h, c = h0, c0
    hs, cs, gates = [], [], []
    for t in range(xw.shape[0]):
        i, f, g, o = _split_gates(xw[t] + h @ w_hh.T)
        c = f * c + i * g
        h = o * torch.tanh(c)
        hs.append(h)
        cs.append(c)
        gates.append(torch.cat([i, f, g, o], dim=-1))
    return torch.stack(hs), torch.stack(cs), torch.stack(gates)


@lstm_scan.register_fake
def _lstm_scan_fake(xw, h0, c0, w_hh):
    t, n = xw.shape[0], xw.shape[1]
    hidden = w_hh.shape[1]
    return xw.new_empty(t, n, hidden), xw.new_empty(t, n, hidden), torch.empty_like(xw)


@torch.library.custom_op("gridfl::lstm_scan_backward", mutates_args=())
def lstm_scan_backward(
    dh_all: torch.Tensor,
    dc_all: torch.Tensor,
    gates: torch.Tensor,
    c_all: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the gates' pre-activations (T, N, 4H), of ``h0`` and of ``c0``."""
    dh_next = torch.zeros_like(c0)
    dc_next = torch.zeros_like(c0)
    da = [torch.empty(0)] * gates.shape[0]
    for t in reversed(range(gates.shape[0])):
        i, f, g, o = gates[t].chunk(4, dim=-1)
        c_prev = c_all[t - 1] if t > 0 else c0
        tc = torch.tanh(c_all[t])
        dh = dh_all[t] + dh_next
        dc = dc_all[t] + dc_next + dh * o * (1 - tc * tc)
        da[t] = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                           dc * i * (1 - g * g), dh * tc * o * (1 - o)], dim=-1)
        dh_next = da[t] @ w_hh
        dc_next = dc * f
    return torch.stack(da), dh_next, dc_next


@lstm_scan_backward.register_fake
def _lstm_scan_backward_fake(dh_all, dc_all, gates, c_all, c0, w_hh):
    return torch.empty_like(gates), torch.empty_like(c0), torch.empty_like(c0)


def _setup_context(ctx, inputs, output):
    _, h0, c0, w_hh = inputs
    h_all, c_all, gates = output
    ctx.save_for_backward(h0, c0, w_hh, h_all, c_all, gates)


def _backward(ctx, dh_all, dc_all, _dgates):
    h0, c0, w_hh, h_all, c_all, gates = ctx.saved_tensors
    dh_all = torch.zeros_like(h_all) if dh_all is None else dh_all
    dc_all = torch.zeros_like(c_all) if dc_all is None else dc_all
    da, dh0, dc0 = torch.ops.gridfl.lstm_scan_backward(dh_all, dc_all, gates, c_all, c0, w_hh)
    h_prev = torch.cat([h0.unsqueeze(0), h_all[:-1]], dim=0)
    four_h, hidden = w_hh.shape
    dw_hh = da.reshape(-1, four_h).T @ h_prev.reshape(-1, hidden)
    return da, dh0, dc0, dw_hh


lstm_scan.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("gridfl::gru_scan", mutates_args=())
def gru_scan(
    xw: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``xw`` (T, N, 3H): input projections with ``b_ih``; returns every h and, per step,
    ``[r, z, n, W_hn h + b_hn]`` (T, N, 4H) for the backward."""
    h = h0
    hs, saved = [], []
    for t in range(xw.shape[0]):
        xr, xz, xn = xw[t].chunk(3, dim=-1)
        hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        hs.append(h)
        saved.append(torch.cat([r, z, n, hn], dim=-1))
    return torch.stack(hs), torch.stack(saved)


@gru_scan.register_fake
def _gru_scan_fake(xw, h0, w_hh, b_hh):
    t, n = xw.shape[0], xw.shape[1]
    hidden = w_hh.shape[1]
    return xw.new_empty(t, n, hidden), xw.new_empty(t, n, 4 * hidden)


@torch.library.custom_op("gridfl::gru_scan_backward", mutates_args=())
def gru_scan_backward(
    dh_all: torch.Tensor, saved: torch.Tensor, h_prev: torch.Tensor, w_hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the input projections (T, N, 3H), of ``h @ W_hh.T + b_hh`` (T, N, 3H)
    and of ``h0``; ``h_prev`` (T, N, H) is the hidden state each step started from."""
    dh_next = torch.zeros_like(h_prev[0])
    steps = saved.shape[0]
    dxw, dhw = [torch.empty(0)] * steps, [torch.empty(0)] * steps
    for t in reversed(range(steps)):
        r, z, n, hn = saved[t].chunk(4, dim=-1)
        dh = dh_all[t] + dh_next
        dan = dh * (1 - z) * (1 - n * n)
        dar = dan * hn * r * (1 - r)
        daz = dh * (h_prev[t] - n) * z * (1 - z)
        dxw[t] = torch.cat([dar, daz, dan], dim=-1)
        dhw[t] = torch.cat([dar, daz, dan * r], dim=-1)
        dh_next = dh * z + dhw[t] @ w_hh
    return torch.stack(dxw), torch.stack(dhw), dh_next


@gru_scan_backward.register_fake
def _gru_scan_backward_fake(dh_all, saved, h_prev, w_hh):
    three_h = w_hh.shape[0]
    t, n = saved.shape[0], saved.shape[1]
    return (saved.new_empty(t, n, three_h), saved.new_empty(t, n, three_h),
            torch.empty_like(h_prev[0]))


def _gru_setup_context(ctx, inputs, output):
    _, h0, w_hh, _ = inputs
    h_all, saved = output
    ctx.save_for_backward(h0, w_hh, h_all, saved)


def _gru_backward(ctx, dh_all, _dsaved):
    h0, w_hh, h_all, saved = ctx.saved_tensors
    dh_all = torch.zeros_like(h_all) if dh_all is None else dh_all
    h_prev = torch.cat([h0.unsqueeze(0), h_all[:-1]], dim=0)
    dxw, dhw, dh0 = torch.ops.gridfl.gru_scan_backward(dh_all, saved, h_prev, w_hh)
    three_h, hidden = w_hh.shape
    flat = dhw.reshape(-1, three_h)
    return dxw, dh0, flat.T @ h_prev.reshape(-1, hidden), flat.sum(0)


gru_scan.register_autograd(_gru_backward, setup_context=_gru_setup_context)


# ---------------------------------------------------------------- aten.lstm / aten.gru as scans
def _check_rnn(name: str, params, per: int, num_layers: int, directions: int, dropout,
               train) -> None:
    if len(params) != per * num_layers * directions:
        raise CompileError(
            f"aten.{name}: an RNN with proj_size cannot be trained in a plan yet; use "
            "proj_size=0"
        )
    if dropout and train and num_layers > 1:
        raise CompileError(
            f"aten.{name}: dropout between RNN layers draws random numbers, which a plan "
            "cannot do; call module.eval() on the RNN or set dropout=0"
        )


def _layers(input, num_layers, directions, batch_first, run_direction):
    """Run every layer and direction; ``run_direction(x, k)`` returns (h_all, h_n-ish)."""
    x = input.transpose(0, 1) if batch_first else input
    finals: list = []
    for layer in range(num_layers):
        outs = []
        for d in range(directions):
            k = layer * directions + d
            seq = x if d == 0 else x.flip(0)
            h_all, final = run_direction(seq, k)
            outs.append(h_all if d == 0 else h_all.flip(0))
            finals.append(final)
        x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)
    return (x.transpose(0, 1) if batch_first else x), finals


def _input_projection(seq, w_ih, bias):
    """Every step's ``x W_ih^T + bias`` at once, as one 2-D product: with the bias it
    exports as one Gemm, not a MatMul and a separate pass adding the bias."""
    x = seq.reshape(-1, seq.shape[-1])
    xw = x @ w_ih.T if bias is None else torch.addmm(bias, x, w_ih.T)
    return xw.reshape(seq.shape[0], seq.shape[1], -1)


def _lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
          batch_first):
    directions = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    _check_rnn("lstm", params, per, num_layers, directions, dropout, train)
    h0_all, c0_all = hx

    def run(seq, k):
        w_ih, w_hh = params[per * k], params[per * k + 1]
        bias = params[per * k + 2] + params[per * k + 3] if has_biases else None
        xw = _input_projection(seq, w_ih, bias)
        h_all, c_all, _ = torch.ops.gridfl.lstm_scan(xw, h0_all[k], c0_all[k], w_hh)
        return h_all, (h_all[-1], c_all[-1])

    out, finals = _layers(input, num_layers, directions, batch_first, run)
    return out, torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals])


def _gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
         batch_first):
    directions = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    _check_rnn("gru", params, per, num_layers, directions, dropout, train)

    def run(seq, k):
        w_ih, w_hh = params[per * k], params[per * k + 1]
        xw = _input_projection(seq, w_ih, params[per * k + 2] if has_biases else None)
        b_hh = params[per * k + 3] if has_biases else w_hh.new_zeros(w_hh.shape[0])
        h_all, _ = torch.ops.gridfl.gru_scan(xw, hx[k], w_hh, b_hh)
        return h_all, h_all[-1]

    out, finals = _layers(input, num_layers, directions, batch_first, run)
    return out, torch.stack(finals)


@contextlib.contextmanager
def rnns_as_scans() -> Iterator[None]:
    """While tracing, ``aten.lstm`` and ``aten.gru`` run as :func:`_lstm` and :func:`_gru`
    instead of torch's unrolled decompositions (all are Python kernels of the ops,
    swapped for the trace only)."""
    keys = (DispatchKey.CompositeImplicitAutograd, DispatchKey.Autograd)
    swaps = {aten.lstm.input: _lstm, aten.gru.input: _gru}
    saved = {(op, k): op.py_kernels.get(k) for op in swaps for k in keys}
    for op, kernel in swaps.items():
        for k in keys:
            op.py_kernels[k] = kernel
        op._dispatch_cache.clear()
    try:
        yield
    finally:
        for (op, k), v in saved.items():
            if v is None:
                op.py_kernels.pop(k, None)
            else:
                op.py_kernels[k] = v
            op._dispatch_cache.clear()


# ---------------------------------------------------------------- export placeholders
def _register_schema(name: str, inputs: list[str], outputs: list[str]) -> None:
    try:
        onnx.defs.get_schema(name, 1, PENDING_DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    onnx.defs.register_schema(OpSchema(
        name, PENDING_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, "T") for n in inputs],
        outputs=[OpSchema.FormalParameter(n, "T") for n in outputs],
        type_constraints=[("T", ["tensor(float)"], "float32")],
    ))


_register_schema("LstmScan", ["xw", "h0", "c0", "w_hh"], ["h_all", "c_all", "gates"])
_register_schema("LstmScanGrad", ["dh_all", "dc_all", "gates", "c_all", "c0", "w_hh"],
                 ["da", "dh0", "dc0"])
_register_schema("GruScan", ["xw", "h0", "w_hh", "b_hh"], ["h_all", "saved"])
_register_schema("GruScanGrad", ["dh_all", "saved", "h_prev", "w_hh"], ["dxw", "dhw", "dh0"])
_pending = values.Opset(PENDING_DOMAIN, 1)


def _lstm_scan_onnx(xw, h0, c0, w_hh):
    return _pending.LstmScan(xw, h0, c0, w_hh)


def _lstm_scan_backward_onnx(dh_all, dc_all, gates, c_all, c0, w_hh):
    return _pending.LstmScanGrad(dh_all, dc_all, gates, c_all, c0, w_hh)


def _gru_scan_onnx(xw, h0, w_hh, b_hh):
    return _pending.GruScan(xw, h0, w_hh, b_hh)


def _gru_scan_backward_onnx(dh_all, saved, h_prev, w_hh):
    return _pending.GruScanGrad(dh_all, saved, h_prev, w_hh)


def translation_table() -> dict:
    return {
        torch.ops.gridfl.lstm_scan.default: _lstm_scan_onnx,
        torch.ops.gridfl.lstm_scan_backward.default: _lstm_scan_backward_onnx,
        torch.ops.gridfl.gru_scan.default: _gru_scan_onnx,
        torch.ops.gridfl.gru_scan_backward.default: _gru_scan_backward_onnx,
    }


# ---------------------------------------------------------------- placeholders -> Scan
def _vi(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _forward_body(w_hh_t: str) -> onnx.GraphProto:
    """One step. The gates and the products the backward needs (``tanh(c)``, ``i g``,
    ``f c_prev``) leave as separate scan outputs (a per-step Concat of the gates, split
    again for the backward, was ~4% of an LSTM training step). One Sigmoid over all four
    gates' columns instead of three measured slower: its extra columns cost more than
    the two nodes it saves."""
    n = helper.make_node
    nodes = [
        n("Gemm", ["h_in", w_hh_t, "xw_t"], ["a"]),
        n("Split", ["a"], ["ai", "af", "ag", "ao"], axis=1, num_outputs=4),
        n("Sigmoid", ["ai"], ["i"]),
        n("Sigmoid", ["af"], ["f"]),
        n("Tanh", ["ag"], ["g"]),
        n("Sigmoid", ["ao"], ["o"]),
        n("Mul", ["f", "c_in"], ["fc"]),
        n("Mul", ["i", "g"], ["ig"]),
        n("Add", ["fc", "ig"], ["c_out"]),
        n("Tanh", ["c_out"], ["tc"]),
        n("Mul", ["o", "tc"], ["h_out"]),
        n("Identity", ["h_out"], ["h_t"]),
        n("Identity", ["c_out"], ["c_t"]),
    ]
    return helper.make_graph(nodes, "lstm_step", [_vi("h_in"), _vi("c_in"), _vi("xw_t")],
                             [_vi("h_out"), _vi("c_out"), _vi("h_t"), _vi("c_t"),
                              *map(_vi, _STEP_OUTPUTS)])


def _backward_body(w_hh: str, with_dc: bool) -> onnx.GraphProto:
    """One reversed step on precomputed factors (see :func:`_lower_backward`): 8 nodes,
    7 without ``dc_t`` (the gradient of every c but the last is zero when only h and
    the final c are used, as with ``nn.LSTM``)."""
    n = helper.make_node
    dc = [n("Add", ["dc_t", "dc_in"], ["dc_0"]), n("Add", ["dc_0", "dc_h"], ["dc"])]
    nodes = [
        n("Add", ["dh_t", "dh_in"], ["dh"]),
        n("Mul", ["dh", "k_t"], ["dc_h"]),
        *(dc if with_dc else [n("Add", ["dc_in", "dc_h"], ["dc"])]),
        n("Concat", ["dc", "dc", "dc", "dh"], ["d4"], axis=1),
        n("Mul", ["d4", "p_t"], ["da_t"]),
        n("MatMul", ["da_t", w_hh], ["dh_out"]),
        n("Mul", ["dc", "f_t"], ["dc_out"]),
    ]
    return helper.make_graph(
        nodes, "lstm_step_backward",
        [_vi("dh_in"), _vi("dc_in"), _vi("dh_t"), *([_vi("dc_t")] if with_dc else []),
         _vi("p_t"), _vi("k_t"), _vi("f_t")],
        [_vi("dh_out"), _vi("dc_out"), _vi("da_t")],
    )


def _forward_scan(kind: str, k: int, states: list[str], xw: str, w_hh: str, body,
                  outputs: list[str]) -> list[onnx.NodeProto]:
    """``Transpose(W_hh)`` then one ``Scan`` over ``xw`` carrying ``states``; ``outputs``
    are the Scan's per-step outputs (the final states are dropped)."""
    p = f"{kind}_scan_{k}"
    w_hh_t = f"{p}/w_hh_t"
    return [
        helper.make_node("Transpose", [w_hh], [w_hh_t], perm=[1, 0]),
        helper.make_node("Scan", [*states, xw],
                         [*(f"{p}/last_{i}" for i in range(len(states))), *outputs],
                         name=p, num_scan_inputs=1, body=body(w_hh_t)),
    ]


_GATES = ("i", "f", "g", "o")
#: What a forward step gives its backward: the gates, tanh(c), i*g and f*c_prev.
_STEP_OUTPUTS = (*_GATES, "tc", "ig", "fc")


class _Graph:
    """What a lowering needs to know about the rest of the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.producer = {o: node for node in graph.node for o in node.output}
        self.zero_constants = {
            init.name for init in graph.initializer
            if init.data_type == TensorProto.FLOAT and not onnx.numpy_helper.to_array(init).any()
        }
        # an LSTM's gates -> its forward's per-step outputs by name, and "h" (h_all)
        self.lstm_steps: dict[str, dict[str, str]] = {}

    def only_read_by(self, name: str, op_type: str) -> bool:
        return name not in self.outputs and all(
            r.domain == PENDING_DOMAIN and r.op_type == op_type
            for r in self.readers.get(name, []))

    def is_zeros(self, name: str) -> bool:
        """Whether ``name`` is a float zero constant expanded to a shape (how autograd
        exports ``zeros_like`` of an unused output's gradient)."""
        node = self.producer.get(name)
        return (node is not None and node.op_type == "Expand"
                and node.input[0] in self.zero_constants)


def _lower_forward(node: onnx.NodeProto, k: int, graph: _Graph) -> list[onnx.NodeProto]:
    xw, h0, c0, w_hh = node.input
    h_all, c_all, gates = node.output
    steps = {name: f"lstm_scan_{k}/{name}" for name in _STEP_OUTPUTS}
    graph.lstm_steps[gates] = {**steps, "h": h_all}
    scan = _forward_scan("lstm", k, [h0, c0], xw, w_hh, _forward_body,
                         [h_all, c_all, *steps.values()])
    if graph.only_read_by(gates, "LstmScanGrad"):
        return scan
    parts = [steps[name] for name in _GATES]
    return [*scan, helper.make_node("Concat", parts, [gates], axis=2)]


def _lower_backward(node: onnx.NodeProto, k: int, graph: _Graph) -> list[onnx.NodeProto]:
    """The gradient as one reversed ``Scan``. Every factor that does not depend on the
    carried gradients (the gates' derivatives times their partners, ``o * tanh'(c)``) is
    computed for all steps at once outside it, so a step runs 8 small nodes, not 29:
    per-node overhead, not arithmetic, dominates a step at these sizes. The factors
    start from the forward's own products (``i g``, ``f c_prev``, ``h = o tanh(c)``), so
    they take 13 passes over the sequence instead of 19."""
    dh_all, dc_all, gates, _c_all, c0, w_hh = node.input
    da, dh0, dc0 = node.output
    fwd = graph.lstm_steps.get(gates)
    if fwd is None:
        raise CompileError("internal: an LSTM backward without its forward in the graph")
    p = f"lstm_scan_grad_{k}"
    with_dc = not graph.is_zeros(dc_all)
    v = lambda name: f"{p}/{name}"  # noqa: E731
    i, f, g, o, tc, ig, fc, h = (fwd[name] for name in (*_STEP_OUTPUTS, "h"))
    scanned = [dh_all, *([dc_all] if with_dc else []), v("p"), v("k"), f]
    n = helper.make_node
    return [
        n("Constant", [], [v("one")],
          value=helper.make_tensor(v("one"), TensorProto.FLOAT, [], [1.0])),
        # sigmoid' = s (1 - s), tanh' = 1 - t^2
        *(n("Sub", [v("one"), gate], [v(f"{name}1")]) for name, gate in
          (("i", i), ("f", f), ("o", o))),
        n("Mul", [g, g], [v("g2")]), n("Sub", [v("one"), v("g2")], [v("sg")]),
        n("Mul", [tc, tc], [v("tc2")]), n("Sub", [v("one"), v("tc2")], [v("dtc")]),
        n("Mul", [o, v("dtc")], [v("k")]),  # dc += dh * o * tanh'(c)
        # da = [dc, dc, dc, dh] * [i g (1-i), f c_prev (1-f), i (1-g^2), h (1-o)]
        n("Mul", [ig, v("i1")], [v("pi")]), n("Mul", [fc, v("f1")], [v("pf")]),
        n("Mul", [i, v("sg")], [v("pg")]), n("Mul", [h, v("o1")], [v("po")]),
        n("Concat", [v("pi"), v("pf"), v("pg"), v("po")], [v("p")], axis=2),
        n("Sub", [c0, c0], [v("zeros")]),
        n("Scan", [v("zeros"), v("zeros"), *scanned], [dh0, dc0, da], name=p,
          num_scan_inputs=len(scanned), scan_input_directions=[1] * len(scanned),
          scan_output_directions=[1], body=_backward_body(w_hh, with_dc)),
    ]


def _one() -> onnx.NodeProto:
    return helper.make_node("Constant", [], ["one"],
                            value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))


def _gru_forward_body(w_hh_t: str, b_hh: str) -> onnx.GraphProto:
    n = helper.make_node
    nodes = [
        _one(),
        n("MatMul", ["h_in", w_hh_t], ["hw0"]),
        n("Add", ["hw0", b_hh], ["hw"]),
        n("Split", ["xw_t"], ["xr", "xz", "xn"], axis=1, num_outputs=3),
        n("Split", ["hw"], ["hr", "hz", "hn"], axis=1, num_outputs=3),
        n("Add", ["xr", "hr"], ["ar"]), n("Sigmoid", ["ar"], ["r"]),
        n("Add", ["xz", "hz"], ["az"]), n("Sigmoid", ["az"], ["z"]),
        n("Mul", ["r", "hn"], ["rhn"]), n("Add", ["xn", "rhn"], ["an"]),
        n("Tanh", ["an"], ["nn"]),
        # h = n + z (h_in - n)
        n("Sub", ["h_in", "nn"], ["hmn"]), n("Mul", ["z", "hmn"], ["zh"]),
        n("Add", ["nn", "zh"], ["h_out"]),
        n("Identity", ["h_out"], ["h_t"]),
        n("Concat", ["r", "z", "nn", "hn"], ["saved_t"], axis=1),
    ]
    return helper.make_graph(nodes, "gru_step", [_vi("h_in"), _vi("xw_t")],
                             [_vi("h_out"), _vi("h_t"), _vi("saved_t")])


def _gru_backward_body(w_hh: str) -> onnx.GraphProto:
    n = helper.make_node
    nodes = [
        _one(),
        n("Add", ["dh_t", "dh_in"], ["dh"]),
        n("Split", ["saved_t"], ["r", "z", "nn", "hn"], axis=1, num_outputs=4),
        n("Sub", ["one", "z"], ["z1"]), n("Mul", ["nn", "nn"], ["n2"]),
        n("Sub", ["one", "n2"], ["n1"]), n("Mul", ["dh", "z1"], ["dn"]),
        n("Mul", ["dn", "n1"], ["dan"]),
        n("Sub", ["one", "r"], ["r1"]), n("Mul", ["r", "r1"], ["sr"]),
        n("Mul", ["dan", "hn"], ["dr"]), n("Mul", ["dr", "sr"], ["dar"]),
        n("Sub", ["hprev_t", "nn"], ["hmn"]), n("Mul", ["dh", "hmn"], ["dz"]),
        n("Mul", ["z", "z1"], ["sz"]), n("Mul", ["dz", "sz"], ["daz"]),
        n("Mul", ["dan", "r"], ["dhn"]),
        n("Concat", ["dar", "daz", "dan"], ["dxw_t"], axis=1),
        n("Concat", ["dar", "daz", "dhn"], ["dhw_t"], axis=1),
        n("MatMul", ["dhw_t", w_hh], ["dh_w"]),
        n("Mul", ["dh", "z"], ["dh_z"]),
        n("Add", ["dh_z", "dh_w"], ["dh_out"]),
    ]
    return helper.make_graph(
        nodes, "gru_step_backward",
        [_vi("dh_in"), _vi("dh_t"), _vi("saved_t"), _vi("hprev_t")],
        [_vi("dh_out"), _vi("dxw_t"), _vi("dhw_t")],
    )


def _lower_gru_forward(node: onnx.NodeProto, k: int, _graph: _Graph) -> list[onnx.NodeProto]:
    xw, h0, w_hh, b_hh = node.input
    return _forward_scan("gru", k, [h0], xw, w_hh,
                         lambda w_hh_t: _gru_forward_body(w_hh_t, b_hh), list(node.output))


def _lower_gru_backward(node: onnx.NodeProto, k: int, _graph: _Graph) -> list[onnx.NodeProto]:
    dh_all, saved, h_prev, w_hh = node.input
    dxw, dhw, dh0 = node.output
    p = f"gru_scan_grad_{k}"
    return [
        helper.make_node("Constant", [], [f"{p}/zero"], value=helper.make_tensor(
            f"{p}/zero", TensorProto.INT64, [1], [0])),
        helper.make_node("Gather", [h_prev, f"{p}/zero"], [f"{p}/h0_1"], axis=0),
        helper.make_node("Squeeze", [f"{p}/h0_1", f"{p}/zero"], [f"{p}/h0"]),
        helper.make_node("Sub", [f"{p}/h0", f"{p}/h0"], [f"{p}/zeros"]),
        helper.make_node(
            "Scan", [f"{p}/zeros", dh_all, saved, h_prev], [dh0, dxw, dhw], name=p,
            num_scan_inputs=3, scan_input_directions=[1] * 3, scan_output_directions=[1, 1],
            body=_gru_backward_body(w_hh)),
    ]


_LOWERINGS = {
    "LstmScan": _lower_forward,
    "LstmScanGrad": _lower_backward,
    "GruScan": _lower_gru_forward,
    "GruScanGrad": _lower_gru_backward,
}


def lower_scans(model: onnx.ModelProto) -> int:
    """Replace the ``gridfl.pending`` placeholders with ``Scan`` nodes; returns how many."""
    graph = model.graph
    known = _Graph(graph)
    out: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.domain != PENDING_DOMAIN:
            out.append(node)
            continue
        lower = _LOWERINGS.get(node.op_type)
        if lower is None:
            raise CompileError(f"internal: no lowering for {node.domain}::{node.op_type}")
        out.extend(lower(node, count, known))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(out)
        kept = [o for o in model.opset_import if o.domain != PENDING_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return count
