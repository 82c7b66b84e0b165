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
    def __init__(self, cell: str, **rnn_options):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(EMB, HIDDEN, batch_first=True, **rnn_options)
        out = HIDDEN * (2 if rnn_options.get("bidirectional") else 1)
        self.fc = nn.Linear(out, VOCAB)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.fc(h[:, -1])


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


def test_lstm_gradient_step_runs_few_nodes():
    """The reversed Scan's body is per-node overhead bound: the factors that do not
    depend on the carried gradients are computed outside it, for all steps at once."""
    X, y = tokens(4, 6, 0)
    plan = compile_training_plan(SeqNet("lstm"), example_data=X, example_target=y)
    scans = {n.name: n for n in onnx.load_from_string(plan.to_bytes()).graph.node
             if n.op_type == "Scan"}
    body = next(a.g for a in scans["lstm_scan_grad_1"].attribute if a.name == "body")
    assert len(body.node) <= 8, [n.op_type for n in body.node]


def test_dropout_between_layers_in_training_mode_is_refused():
    X, y = tokens(4, 5, 0)
    model = SeqNet("gru", num_layers=2, dropout=0.3)
    with pytest.raises(CompileError, match=r"aten\.gru: dropout between RNN layers"):
        compile_training_plan(model, example_data=X, example_target=y)
