"""compile_plan / evaluation / averaging plans, roles, losses and compile-time errors."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl import CompileError
from gridfl.plan import Plan

from .eager import assert_close, eager_step

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from gridfl.compiler import (  # noqa: E402
    SGD,
    compile_averaging_plan,
    compile_evaluation_plan,
    compile_plan,
    compile_training_plan,
)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_averaging_plan():
    params = [np.ones((3, 2), np.float32), np.zeros(4, np.float32)]
    plan = compile_averaging_plan(params)
    assert plan.kind == "averaging"
    assert [s.role for s in plan.inputs] == ["average"] * 2 + ["item"] * 2 + ["count"]
    assert [s.role for s in plan.outputs] == ["average"] * 2
    assert plan.num_params == 2
    rng = np.random.default_rng(0)
    items = [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(5)]
    avg = [np.zeros_like(p) for p in params]
    for num, item in enumerate(items):
        avg = Plan.from_bytes(plan.to_bytes()).execute(*avg, *item, num)
    for k in range(2):
        assert_close(avg[k], np.mean([it[k] for it in items], axis=0), what=f"avg {k}")


def test_evaluation_plan():
    net = small_net().train()
    X, y = data(10)
    plan = compile_evaluation_plan(net, example_data=X, example_target=y)
    assert net.training  # mode restored
    assert plan.kind == "evaluation"
    assert [s.role for s in plan.inputs] == ["data", "target"] + ["model_param"] * 4
    assert [(s.role, s.key) for s in plan.outputs] == [("loss", None), ("metric", "accuracy")]
    X, y = data(7, 1)
    params = [p.detach().numpy() for p in net.parameters()]
    loss, acc = plan.execute(X, y, *params)
    with torch.no_grad():
        out = net(X)
    assert_close(loss, float(F.cross_entropy(out, y)), rtol=1e-5)
    assert float(acc) == pytest.approx(float((out.argmax(1) == y).float().mean()))


@pytest.mark.parametrize("loss", ["cross_entropy_onehot", "mse"])
def test_float_target_losses(loss):
    net = small_net()
    X, y = data(8)
    t = F.one_hot(y, 4).float()
    if loss == "mse":
        t = t * 0.8 + 0.1
    plan = compile_training_plan(net, loss=loss, optimizer=SGD(lr=0.2), example_data=X,
                                 example_target=t)
    assert plan.inputs[1].dtype == np.float32 and plan.inputs[1].shape == (None, 4)
    X, y = data(5, 3)
    t = F.one_hot(y, 4).float()
    params = [p.detach().numpy() for p in net.parameters()]
    loss_v, acc, *new = plan.execute(X, t, 5, 0.2, *params)
    losses, ref = eager_step(net, X, t, 0.2, loss=loss)
    assert_close(loss_v, losses[0], rtol=1e-5)
    assert 0 <= float(acc) <= 1
    for got, want in zip(new, ref, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_mse_single_output_has_no_accuracy():
    torch.manual_seed(0)
    net = nn.Linear(6, 1)
    X, _ = data(8)
    plan = compile_training_plan(net, loss="mse", example_data=X, example_target=X[:, :1])
    assert [s.role for s in plan.outputs] == ["loss", "model_param", "model_param"]
    assert plan.metric_names == []


def test_custom_roles_and_names():
    W = torch.randn(4, 6) * 0.1

    def step(X, lr, W, y):  # unusual argument order, no batch_size
        loss = F.cross_entropy(X @ W.T, y)
        (g,) = torch.autograd.grad(loss, [W])
        return W - lr * g, loss

    X, y = data(8)
    plan = compile_plan(step, (X, 0.5, W, y),
                        input_roles=["data", "client_config:learning_rate", "model_param",
                                     "target"],
                        output_roles=["model_param", "loss"])
    assert plan.client_config_keys == ["learning_rate"]
    assert [s.name for s in plan.inputs] == ["X", "learning_rate", "param_0", "y"]
    new_w, loss = plan.execute(*plan.bind(data=X, target=y, params=[W],
                                          client_config={"learning_rate": 0.5}))
    Wr = W.clone().requires_grad_()
    ref = F.cross_entropy(X @ Wr.T, y)
    ref.backward()
    assert_close(new_w, (W - 0.5 * Wr.grad).numpy())
    assert_close(loss, float(ref.detach()), rtol=1e-5)


def test_batch_of_one_example_still_dynamic():
    net = small_net()
    X, y = data(1)
    plan = compile_training_plan(net, example_data=X, example_target=y)
    assert plan.inputs[0].shape == (None, 6)
    X, y = data(5)
    params = [p.detach().numpy() for p in net.parameters()]
    loss, *_ = plan.execute(X, y, 5, 0.1, *params)
    assert_close(loss, eager_step(net, X, y, 0.1)[0][0], rtol=1e-5)


def test_fixed_batch_function_compiles_static_with_warning():
    W = torch.randn(3, 3)

    def evaluate(X, y, W):
        out = X.view(8, 3) @ W
        return ((out - y) ** 2).mean(), (out.argmax(1) == y.argmax(1)).float().mean()

    with pytest.warns(UserWarning, match="only accepts batches of 8"):
        plan = compile_plan(evaluate, (torch.rand(8, 3), torch.rand(8, 3), W),
                            kind="evaluation")
    assert plan.inputs[0].shape == (8, 3)


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "match"),
    [
        (lambda X, y, W: (torch.kthvalue(X @ W, 2, dim=1).values.sum(),),
         (torch.rand(4, 3), torch.rand(4, 3), torch.rand(3, 3)), {"kind": "evaluation"},
         r"op aten\.kthvalue has no ONNX translation"),
        (lambda X, y, W: (X @ W).sum(), (torch.rand(4, 3), torch.rand(4, 3), torch.rand(3, 3)),
         {"kind": "inference"}, "unknown plan kind 'inference'"),
        (lambda X, y, b, lr, W: (X,), (torch.rand(4, 3),) * 4, {}, "at least 5 example args"),
        (lambda X, y, W: (X.sum(),), (torch.rand(4, 3), torch.rand(4, 3), "W"),
         {"kind": "evaluation"}, "expected a tensor, array or number, got str"),
        (lambda X, y, W: (X.sum(),), (torch.rand(4, 3), torch.rand(4, 3), torch.rand(3)),
         {"kind": "evaluation", "input_roles": ["data", "target", "weights"]},
         "unknown role 'weights'"),
        (lambda X, y, W: (X.sum(),), (torch.rand(4, 3), torch.rand(4, 3), torch.rand(3)),
         {"kind": "evaluation", "input_roles": ["data", "target"]},
         "3 example args but 2 input roles"),
        (lambda X, y, W: (X @ W,), (torch.rand(4, 3), torch.rand(4, 3), torch.rand(2, 2)),
         {"kind": "evaluation"}, "fails on the example args: RuntimeError"),
        (lambda X, y, W: "loss", (torch.rand(4, 3), torch.rand(4, 3), torch.rand(2, 2)),
         {"kind": "evaluation"}, "must return a tensor or a tuple"),
        (lambda X, y, W: (X.sum(),), (torch.rand(4, 3), torch.rand(5, 3), torch.rand(2)),
         {"kind": "evaluation"}, r"different batch sizes \[4, 5\]"),
    ],
)
def test_compile_errors(fn, args, kwargs, match):
    with pytest.raises(CompileError, match=match):
        compile_plan(fn, args, **kwargs)


def test_module_errors():
    X, y = data(4)
    with pytest.raises(CompileError, match="unknown loss 'hinge'"):
        compile_training_plan(small_net(), loss="hinge", example_data=X, example_target=y)
    with pytest.raises(CompileError, match="class-index targets"):
        compile_training_plan(small_net(), example_data=X, example_target=y.float())
    with pytest.raises(CompileError, match="unsupported optimizer RMSprop"):
        net = small_net()
        compile_training_plan(net, optimizer=torch.optim.RMSprop(net.parameters()),
                              example_data=X, example_target=y)
    with pytest.raises(CompileError, match="no parameters"):
        compile_training_plan(nn.ReLU(), example_data=X, example_target=y)
    with pytest.raises(CompileError, match=r"expected a torch\.nn\.Module"):
        compile_training_plan(lambda x: x, example_data=X, example_target=y)
    with pytest.raises(CompileError, match="nesterov needs momentum"):
        SGD(nesterov=True)
