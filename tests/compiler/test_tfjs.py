"""The tfjs variant's translation, checked without Node.js: every compile with
``tfjs=True`` runs the tfjs actions with numpy against eager PyTorch, so a model that
compiles here computes the step PyTorch does (the syft.js runs are tests/interop)."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl import CompileError
from gridfl.compiler import SGD, compile_training_plan

torch = pytest.importorskip("torch")
nn = torch.nn


def _compile(net, X, y, loss="cross_entropy"):
    return compile_training_plan(net, loss=loss, optimizer=SGD(lr=0.1), example_data=X,
                                 example_target=y, tfjs=True)


@pytest.mark.parametrize("loss", ["cross_entropy", "cross_entropy_onehot", "mse"])
def test_each_loss_translates(loss):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    X = torch.randn(9, 6)
    y = {"cross_entropy": torch.randint(0, 3, (9,)),
         "cross_entropy_onehot": nn.functional.one_hot(torch.randint(0, 3, (9,)), 3).float(),
         "mse": torch.randn(9, 3)}[loss]
    plan = _compile(net, X, y, loss)
    assert plan.tfjs is not None and plan.tfjs.endswith(b"J\x04tfjs")
    assert b"tf.tanh" in plan.tfjs


def test_check_catches_a_wrong_translation(monkeypatch):
    """The numpy run is a real check: relu translated as sigmoid fails the compile."""
    from gridfl.compiler import tfjs

    relu = torch.ops.aten.relu.default
    monkeypatch.setitem(tfjs._RULES, relu, lambda t, node, x: t.emit("sigmoid", x))
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(CompileError, match="tfjs plan disagrees with eager PyTorch"):
        _compile(net, torch.randn(8, 4), torch.randint(0, 3, (8,)))


@pytest.mark.parametrize(("pool", "side", "why"), [
    (nn.MaxPool2d(3, stride=2), 2, "with overlapping, padded or dilated windows"),
    (nn.MaxPool2d(2, padding=1), 3, "with overlapping, padded or dilated windows"),
    (nn.MaxPool2d(2), 2, "over 5x5 maps that 2x2 windows do not tile"),
])
def test_max_pool_whose_windows_do_not_tile_is_refused_naming_the_op(pool, side, why):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), pool, nn.Flatten(),
                        nn.Linear(2 * side * side, 3))
    with pytest.raises(CompileError, match=rf"op gridfl::max_pool2d {why} has no tfjs"):
        _compile(net, torch.randn(4, 1, 7, 7), torch.randint(0, 3, (4,)))


@pytest.mark.parametrize(("layer", "op"), [
    (nn.Conv2d(1, 2, 3, groups=1, stride=2), "op gridfl::conv2d_weight_grad with stride"),
    (nn.Conv2d(1, 2, 3, dilation=2, padding=2), "op aten::convolution with groups or dilation"),
])
def test_unsupported_conv_is_refused_naming_the_op(layer, op):
    net = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(1, 1, 9, 9))  # materialize the lazy layer
    with pytest.raises(CompileError, match=op):
        _compile(net, torch.randn(4, 1, 9, 9), torch.randint(0, 3, (4,)))


def test_conv_pool_step_with_ties_matches_eager():
    """Blank images: every max-pool window is a tie, where PyTorch routes the gradient to
    the first maximum only; the compile's check fails unless the tfjs form does too."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        net[0].bias.fill_(0.5)  # relu(bias) > 0 on blank input: positive ties
    X = torch.zeros(5, 1, 8, 8)
    X[:, :, 2:5, 3:6] = torch.rand(5, 1, 3, 3)
    plan = _compile(net, X, torch.randint(0, 2, (5,)))
    assert b"tf.oneHot" in plan.tfjs and b"tf.conv2d" in plan.tfjs
    assert np.isfinite(plan.execute(X, torch.randint(0, 2, (5,)), 5, 0.1,
                                    *[p.detach() for p in net.parameters()])[0])


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam", "adamw"])
def test_stateful_optimizers_translate(optimizer):
    """Momentum and Adam(W) steps (their state as plan inputs and outputs, their
    constants written into the plan) pass the check against eager PyTorch."""
    from gridfl.compiler import Adam, AdamW

    opt = {"sgd_momentum": SGD(lr=0.1, momentum=0.9), "adam": Adam(lr=0.01),
           "adamw": AdamW(lr=0.01)}[optimizer]
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    plan = compile_training_plan(net, optimizer=opt, example_data=torch.randn(9, 6),
                                 example_target=torch.randint(0, 3, (9,)), tfjs=True)
    assert plan.num_optimizer_state > 0 and plan.tfjs is not None


def _captured_tfjs_plan(monkeypatch) -> list:
    """The TfjsPlan objects the compile checks (their actions run with numpy below)."""
    from gridfl.compiler import tfjs

    plans: list = []
    check = tfjs.check_against

    def capture(plan, checks, names):
        plans.append(plan)
        return check(plan, checks, names)

    monkeypatch.setattr(tfjs, "check_against", capture)
    return plans


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_evaluation_plan_translates_and_means_over_the_batch_it_is_given(monkeypatch):
    """The tfjs evaluation plan of a 2NN-shaped MLP, run with numpy at batch sizes it was
    not compiled with, gives the mean cross-entropy and accuracy of a numpy forward pass
    (the mean divides by a batch size the plan counts itself: syft.js passes none)."""
    from gridfl.compiler import compile_evaluation_plan
    from gridfl.compiler.tfjs import run_numpy

    plans = _captured_tfjs_plan(monkeypatch)
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                        nn.Linear(8, 4))
    plan = compile_evaluation_plan(net, example_data=torch.randn(6, 12),
                                   example_target=torch.randint(0, 4, (6,)), tfjs=True,
                                   cache=False)
    assert b"evaluation_plan" in plan.tfjs and len(plans) == 1
    params = [p.detach().numpy() for p in net.parameters()]
    rng = np.random.default_rng(0)
    for n in (1, 13, 40):
        X = rng.normal(size=(n, 12)).astype(np.float32)
        y = rng.integers(0, 4, n)
        h = np.maximum(X @ params[0].T + params[1], 0)
        h = np.maximum(h @ params[2].T + params[3], 0)
        logits = h @ params[4].T + params[5]
        want_loss = -_log_softmax(logits)[np.arange(n), y].mean()
        want_acc = (logits.argmax(1) == y).mean()
        loss, acc = run_numpy(plans[0], [X, y, *params])
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        np.testing.assert_allclose(acc, want_acc, rtol=1e-6)


def test_evaluation_plan_of_the_mcmahan_cnn_translates():
    from gridfl.compiler import compile_evaluation_plan
    from gridfl.demo.models import build_model

    plan = compile_evaluation_plan(build_model("cnn"), example_data=torch.rand(5, 784),
                                   example_target=torch.randint(0, 10, (5,)), tfjs=True,
                                   cache=False)
    assert plan.tfjs is not None and b"tf.conv2d" in plan.tfjs


def test_evaluation_plan_with_an_untranslated_op_is_refused_naming_it():
    from gridfl.compiler import compile_evaluation_plan

    net = nn.Sequential(nn.Linear(4, 5), nn.ELU(), nn.Linear(5, 3))
    with pytest.raises(CompileError, match=r"op aten::elu has no tfjs translation"):
        compile_evaluation_plan(net, example_data=torch.randn(6, 4),
                                example_target=torch.randint(0, 3, (6,)), tfjs=True,
                                cache=False)
