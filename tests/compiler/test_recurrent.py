"""LSTM and GRU layers compile to ONNX Scan loops and train like eager PyTorch.

Verification inside the compiler already compares the plan with eager PyTorch (torch's
own LSTM/GRU kernels, not the Scan formulation) at two batch sizes; here several steps
are checked against ``torch.optim.SGD`` and the graph size against the sequence length."""

from __future__ import annotations

import onnx
import pytest

from gridfl import CompileError

from .eager import assert_close, eager_step

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from gridfl.compiler import SGD, compile_training_plan  # noqa: E402

VOCAB, EMB, HIDDEN = 12, 4, 6


class SeqNet(nn.Module):
    """``readout="c"`` classifies from the LSTM's final cell state instead of the last h,
    so every step's cell state gets a gradient from outside the recurrence; ``"first"``
    from the first step's h."""

    def __init__(self, cell: str, readout: str = "h", padding_idx: int | None = None,
                 **rnn_options):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB, padding_idx=padding_idx)
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(EMB, HIDDEN, batch_first=True, **rnn_options)
        out = HIDDEN * (2 if rnn_options.get("bidirectional") else 1)
        self.fc = nn.Linear(out, VOCAB)
        self.readout = readout

    def forward(self, x):
        h, state = self.rnn(self.emb(x))
        if self.readout == "c":
            return self.fc(state[1][-1])
        return self.fc(h[:, 0 if self.readout == "first" else -1])


def tokens(n: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (n, seq), generator=g),
            torch.randint(0, VOCAB, (n,), generator=g))


def scans(plan) -> int:
    model = onnx.load_from_string(plan.to_bytes())
    return sum(n.op_type == "Scan" for n in model.graph.node)


CASES = {
    "lstm": ("lstm", {}),
    "gru": ("gru", {}),
    "lstm_2layers_bidirectional": ("lstm", {"num_layers": 2, "bidirectional": True}),
    "gru_no_bias": ("gru", {"bias": False}),
    "lstm_final_cell_state": ("lstm", {"readout": "c"}),
    "lstm_first_step_padding_idx": ("lstm", {"readout": "first", "padding_idx": 0}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rnn_trains_like_eager(name):
    cell, options = CASES[name]
    torch.manual_seed(0)
    model = SeqNet(cell, **options)
    X, y = tokens(5, 7, 1)
    plan = compile_training_plan(model, optimizer=SGD(lr=0.5), example_data=X,
                                 example_target=y)
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    assert scans(plan) == 2 * layers  # one forward and one backward Scan per direction
    params = [p.detach().numpy() for p in model.parameters()]
    for step, n in enumerate((5, 3, 8)):
        X, y = tokens(n, 7, 10 + step)
        loss, _, *params = plan.execute(X, y, n, 0.5, *params)
        ref = SeqNet(cell, **options)
        with torch.no_grad():
            for p, v in zip(ref.parameters(), model.parameters(), strict=True):
                p.copy_(v)
        losses, want = eager_step(ref, X, y, 0.5)
        assert_close(loss, losses[0], rtol=1e-5, what=f"{name} loss {step}")
        for i, (got, w) in enumerate(zip(params, want, strict=True)):
            assert_close(got, w, rtol=1e-4, atol=1e-6, what=f"{name} param {i} step {step}")
        with torch.no_grad():  # the next step starts from the plan's params
            for p, v in zip(model.parameters(), params, strict=True):
                p.copy_(torch.from_numpy(v))


def test_graph_size_does_not_grow_with_the_sequence():
    torch.manual_seed(0)
    sizes = []
    for seq in (4, 32):
        X, y = tokens(4, seq, 0)
        plan = compile_training_plan(SeqNet("lstm"), example_data=X, example_target=y)
        sizes.append(len(onnx.load_from_string(plan.to_bytes()).graph.node))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize(("readout", "backward_nodes"), [("h", 7), ("c", 8)])
def test_lstm_steps_run_few_nodes(readout, backward_nodes):
    """A Scan's body is per-node overhead bound: the factors that do not depend on the
    carried gradients are computed outside the reversed one, for all steps at once; the
    gates and the products the backward needs leave the forward one as outputs, read by
    the backward without a Concat, a Split, a second Tanh or a shifted copy of c; a cell
    state gradient that is zero (only h read) is not scanned."""
    X, y = tokens(4, 6, 0)
    plan = compile_training_plan(SeqNet("lstm", readout=readout), example_data=X,
                                 example_target=y)
    graph = onnx.load_from_string(plan.to_bytes()).graph
    scans = {n.name: n for n in graph.node if n.op_type == "Scan"}
    bodies = {name: next(a.g for a in n.attribute if a.name == "body")
              for name, n in scans.items()}
    ops = {name: [n.op_type for n in body.node] for name, body in bodies.items()}
    assert len(ops["lstm_scan_grad_1"]) == backward_nodes, ops["lstm_scan_grad_1"]
    assert len(ops["lstm_scan_0"]) == 13 and "Concat" not in ops["lstm_scan_0"]
    outputs = scans["lstm_scan_0"].output
    gates, products = outputs[4:8], outputs[8:]
    assert len(gates) == 4 and len(products) == 3  # tanh(c), i*g, f*c_prev
    readers = [n.op_type for n in graph.node for g in gates if g in n.input]
    assert "Concat" not in readers and "Split" not in readers, readers
    # the backward starts from the forward's products instead of taking them again
    assert all(any(v in n.input for n in graph.node) for v in products)
    ops = [n.op_type for n in graph.node]
    assert ops.count("Tanh") == 0, ops


def test_lowered_lstm_forward_gives_the_gates_when_they_are_read():
    """A forward whose gates something else reads gets them concatenated back, in the
    eager kernel's layout (checked against it)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gridfl.compiler.recurrent import PENDING_DOMAIN, lower_scans

    T, N, H = 3, 2, 5
    shapes = {"xw": [T, N, 4 * H], "h0": [N, H], "c0": [N, H], "w_hh": [4 * H, H],
              "h_all": [T, N, H], "c_all": [T, N, H], "gates": [T, N, 4 * H]}
    f32 = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name])  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("LstmScan", ["xw", "h0", "c0", "w_hh"], ["h_all", "c_all", "gates"],
                          domain=PENDING_DOMAIN)],
        "lstm", [f32(n) for n in ("xw", "h0", "c0", "w_hh")],
        [f32(n) for n in ("h_all", "c_all", "gates")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(PENDING_DOMAIN, 1)])
    assert lower_scans(model) == 1
    assert any(n.op_type == "Concat" for n in model.graph.node)
    g = torch.Generator().manual_seed(0)
    inputs = {"xw": torch.randn(T, N, 4 * H, generator=g), "h0": torch.randn(N, H, generator=g),
              "c0": torch.randn(N, H, generator=g), "w_hh": torch.randn(4 * H, H, generator=g)}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    want = torch.ops.gridfl.lstm_scan(*inputs.values())
    for name, a, b in zip(("h_all", "c_all", "gates"), got, want, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_dropout_between_layers_in_training_mode_is_refused():
    X, y = tokens(4, 5, 0)
    model = SeqNet("gru", num_layers=2, dropout=0.3)
    with pytest.raises(CompileError, match=r"aten\.gru: dropout between RNN layers"):
        compile_training_plan(model, example_data=X, example_target=y)
