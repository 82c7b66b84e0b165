"""The PySyft MNIST training plan (interop/README.md), compiled and run as a gridfl plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gridfl.plan import Plan

from .eager import VECTORS, vector

torch = pytest.importorskip("torch")
from gridfl.compiler import compile_plan  # noqa: E402
from gridfl.state import loads  # noqa: E402


def mnist_training_plan(X, y, batch_size, lr, W1, b1, W2, b2):
    """The syft.js 0.1.4 MNIST plan, as in tests/vectors/README.md."""
    params = [W1, b1, W2, b2]
    logits = torch.relu(X @ W1.T + b1) @ W2.T + b2
    norm = logits - logits.max()  # one global max, not per row
    log_probs = norm - torch.log(torch.sum(torch.exp(norm), dim=1, keepdim=True))
    loss = -torch.sum(y * log_probs) / batch_size
    grads = torch.autograd.grad(loss, params)
    updated = [p - lr * g for p, g in zip(params, grads, strict=True)]
    acc = torch.sum(torch.argmax(logits, 1) == torch.argmax(y, 1)) / batch_size
    return (loss, acc, *updated)


@pytest.fixture(scope="module")
def data():
    X, y = loads(vector("mnist_batch_data.pb"))
    params = loads(vector("mnist_model_params.pb"))
    expected = loads(vector("mnist_upd_model_params.pb"))
    scalars = json.loads((VECTORS / "scalars.json").read_text())
    return X, y, params, expected, scalars


@pytest.fixture(scope="module")
def plan(data):
    X, y, params, _, scalars = data
    example = (torch.from_numpy(X), torch.from_numpy(y), scalars["MNIST_BATCH_SIZE"],
               scalars["MNIST_LR"], *map(torch.from_numpy, params))
    return compile_plan(mnist_training_plan, example)


def test_pysyft_mnist_reference(plan, data):
    X, y, params, expected, scalars = data
    # through bytes, as a worker gets it
    worker_plan = Plan.from_bytes(plan.to_bytes())
    loss, acc, *updated = worker_plan.execute(
        X, y, scalars["MNIST_BATCH_SIZE"], scalars["MNIST_LR"], *params
    )
    assert float(loss) == pytest.approx(scalars["MNIST_LOSS"], rel=1e-6)
    assert float(acc) == pytest.approx(scalars["MNIST_ACCURACY"], abs=1e-7)
    assert len(updated) == 4
    for i, (got, want) in enumerate(zip(updated, expected, strict=True)):
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.max(np.abs(got - want)) <= 1e-6, f"param {i}"


def test_reference_plan_metadata(plan):
    assert plan.kind == "training"
    assert [(s.role, s.key, s.index) for s in plan.inputs] == [
        ("data", None, None), ("target", None, None), ("batch_size", None, None),
        ("client_config", "lr", None), ("model_param", None, 0), ("model_param", None, 1),
        ("model_param", None, 2), ("model_param", None, 3),
    ]
    assert [(s.role, s.key, s.index) for s in plan.outputs] == [
        ("loss", None, None), ("metric", "accuracy", None), ("model_param", None, 0),
        ("model_param", None, 1), ("model_param", None, 2), ("model_param", None, 3),
    ]
    assert plan.inputs[0].shape == (None, 784)  # dynamic batch


def test_reference_plan_other_batch_and_torch_inputs(plan, data):
    X, y, params, _, _ = data
    Xt, yt = torch.from_numpy(X[:10]), torch.from_numpy(y[:10])
    ps = [torch.from_numpy(p) for p in params]
    loss, acc, *updated = plan.execute(Xt, yt, torch.tensor(10.0), 0.005, *ps)
    ref = mnist_training_plan(Xt, yt, 10.0, 0.005, *[p.clone().requires_grad_() for p in ps])
    assert float(loss) == pytest.approx(float(ref[0].detach()), rel=1e-5)
    assert 0.0 <= float(acc) <= 1.0
    assert float(acc) == pytest.approx(float(ref[1]))
    for got, want in zip(updated, ref[2:], strict=True):
        np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-6)


def test_reference_step_with_one_element_scalars(data):
    """PySyft-style scalars, ``torch.tensor([64.0])``: verified at another batch size too."""
    X, y, params, expected, scalars = data
    batch_size = torch.tensor([float(scalars["MNIST_BATCH_SIZE"])])
    lr = torch.tensor([scalars["MNIST_LR"]])
    example = (torch.from_numpy(X), torch.from_numpy(y), batch_size, lr,
               *map(torch.from_numpy, params))
    plan = compile_plan(mnist_training_plan, example)
    assert plan.inputs[2].shape == (1,) and plan.inputs[3].shape == (1,)
    loss, acc, *updated = plan.execute(X, y, np.array([64.0], np.float32),
                                       np.array([scalars["MNIST_LR"]], np.float32), *params)
    # [1]-shaped scalars broadcast: the loss comes out [1]-shaped, as in eager PyTorch
    assert float(loss.reshape(())) == pytest.approx(scalars["MNIST_LOSS"], rel=1e-6)
    assert float(acc.reshape(())) == pytest.approx(scalars["MNIST_ACCURACY"], abs=1e-7)
    for got, want in zip(updated, expected, strict=True):
        assert np.max(np.abs(got - want)) <= 1e-6
    # a batch of 10, checked against eager PyTorch computed here
    Xt, yt = torch.from_numpy(X[:10]), torch.from_numpy(y[:10])
    ps = [torch.from_numpy(p) for p in params]
    got = plan.execute(Xt, yt, np.array([10.0], np.float32), lr, *ps)
    ref = mnist_training_plan(Xt, yt, torch.tensor([10.0]), lr,
                              *[p.clone().requires_grad_() for p in ps])
    assert float(got[0].reshape(())) == pytest.approx(float(ref[0].detach()), rel=1e-5)
    for g, r in zip(got[2:], ref[2:], strict=True):
        np.testing.assert_allclose(g, r.detach().numpy(), atol=1e-6)
