"""The McMahan CNN and 2NN: compiled plans match eager PyTorch step for step."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl.plan import Plan

from .eager import assert_close, eager_step

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from gridfl.compiler import SGD, compile_training_plan  # noqa: E402


def mcmahan_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 10),
    )


def mcmahan_2nn():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, 10),
    )


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(1)
    model = mcmahan_cnn()
    X, y = batch(8, 0)
    plan = compile_training_plan(model, loss="cross_entropy", optimizer=SGD(lr=0.05),
                                 example_data=X, example_target=y)
    return model, Plan.from_bytes(plan.to_bytes())


@pytest.fixture(scope="module")
def nn2():
    torch.manual_seed(2)
    model = mcmahan_2nn()
    X, y = batch(8, 0)
    plan = compile_training_plan(model, loss="cross_entropy", optimizer=SGD(lr=0.05),
                                 example_data=X, example_target=y)
    return model, plan


def test_cnn_param_count():
    assert sum(p.numel() for p in mcmahan_cnn().parameters()) == 1_663_370


@pytest.mark.parametrize("fixture", ["cnn", "nn2"])
def test_matches_eager_over_batches(fixture, request):
    """Several steps, the last batch smaller (same plan: dynamic batch dimension)."""
    model, plan = request.getfixturevalue(fixture)
    assert plan.inputs[0].shape[0] is None
    params = [p.detach().numpy().copy() for p in model.parameters()]
    ref_model = model
    lr = 0.05
    for step, n in enumerate([32, 32, 7]):
        X, y = batch(n, 10 + step)
        loss, acc, *params = plan.execute(X.numpy(), y.numpy(), n, lr, *params)
        losses, ref_params = eager_step(ref_model, X, y, lr)
        assert_close(loss, losses[0], rtol=1e-5, what=f"loss step {step}")
        assert 0.0 <= float(acc) <= 1.0
        assert acc.dtype == np.float32
        for i, (got, want) in enumerate(zip(params, ref_params, strict=True)):
            assert_close(got, want, rtol=1e-4, atol=1e-6, what=f"param {i} step {step}")
        # continue from the eager params so errors do not compound
        params = [p.copy() for p in ref_params]
        ref_model = _with_params(model, ref_params)


def _with_params(model, params):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(m.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(v))
    return m


def test_accuracy_value(nn2):
    model, plan = nn2
    X, _ = batch(16, 5)
    y = model(X).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # 12 of 16 right
    params = [p.detach().numpy() for p in model.parameters()]
    _, acc, *_ = plan.execute(X, y, 16, 0.0, *params)
    assert float(acc) == pytest.approx(0.75)


def test_momentum_matches_torch_sgd():
    torch.manual_seed(3)
    model = mcmahan_2nn()
    X, y = batch(8, 0)
    plan = compile_training_plan(model, loss="cross_entropy",
                                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1,
                                                           momentum=0.9),
                                 example_data=X, example_target=y)
    n = len(model.state_dict())
    assert plan.num_optimizer_state == n
    assert [s.role for s in plan.outputs][-n:] == ["optimizer_state"] * n
    assert [s.index for s in plan.inputs if s.role == "optimizer_state"] == list(range(n))

    ref = _with_params(model, [p.detach().numpy() for p in model.parameters()])
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    params = [p.detach().numpy().copy() for p in model.parameters()]
    state = [np.zeros_like(p) for p in params]
    for step, size in enumerate([16, 16, 5]):
        Xb, yb = batch(size, 20 + step)
        out = plan.execute(*plan.bind(data=Xb, target=yb, params=params,
                                      optimizer_state=state, client_config={"lr": 0.1}))
        loss, params, state = out[0], out[2:2 + n], out[2 + n:]
        opt.zero_grad()
        ref_loss = torch.nn.functional.cross_entropy(ref(Xb), yb)
        ref_loss.backward()
        opt.step()
        assert_close(loss, float(ref_loss.detach()), rtol=1e-5, what=f"loss {step}")
        for i, (got, p) in enumerate(zip(params, ref.parameters(), strict=True)):
            assert_close(got, p.detach().numpy(), rtol=1e-4, atol=1e-6, what=f"param {i}")
            assert_close(state[i], opt.state[p]["momentum_buffer"].numpy(), rtol=1e-4,
                         atol=1e-6, what=f"momentum {i}")
