"""Names the docstring examples of ``src/gridfl`` use, so that they run as written.

A small MNIST-shaped MLP (784 -> 32 -> 10, four params), a batch of data and its training
plan, compiled once per session into a throwaway plan cache. Each example runs in its own
temporary directory holding that plan as ``training_plan.onnx``.
"""

from __future__ import annotations

import pytest

_USERS = ("gridfl.plan", "gridfl.compiler", "gridfl.client.trainer")  # the modules that need them


@pytest.fixture(scope="session")
def _examples(tmp_path_factory):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    mp = pytest.MonkeyPatch()
    mp.setenv("GRIDFL_PLAN_CACHE", str(tmp_path_factory.mktemp("plan-cache")))

    from gridfl import SyftModel
    from gridfl.compiler import SGD, compile_training_plan

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    X = torch.rand(64, 784)
    y = torch.randint(0, 10, (64,))
    plan = compile_training_plan(
        net, loss="cross_entropy", optimizer=SGD(lr=0.1), example_data=X[:32],
        example_target=y[:32],
    )
    params = [p.detach().numpy().copy() for p in net.parameters()]
    W = torch.zeros(10, 784, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    def train_step(X, y, batch_size, lr, W, b):  # the PyGrid training signature
        logits = X @ W.T + b
        loss = torch.nn.functional.cross_entropy(logits, y)
        gW, gb = torch.autograd.grad(loss, [W, b])
        acc = (logits.argmax(1) == y).float().mean()
        return loss, acc, W - lr * gW, b - lr * gb

    yield {
        "train_step": train_step,
        "np": np,
        "torch": torch,
        "net": net,
        "X": X,
        "y": y,
        "Y": torch.nn.functional.one_hot(y, 10).float(),
        "X_test": X.numpy(),
        "y_test": y.numpy(),
        "W": W,
        "b": b,
        "params": params,
        "model": SyftModel(params),
        "plan": plan,
        "plan_bytes": plan.to_bytes(),
    }
    mp.undo()


@pytest.fixture(autouse=True)
def _example_namespace(request, tmp_path, monkeypatch):
    if not isinstance(request.node, pytest.DoctestItem) or not request.node.name.startswith(
        _USERS
    ):
        return
    namespace = request.getfixturevalue("doctest_namespace")
    examples = request.getfixturevalue("_examples")
    namespace.update(examples)
    (tmp_path / "training_plan.onnx").write_bytes(examples["plan_bytes"])
    monkeypatch.chdir(tmp_path)
