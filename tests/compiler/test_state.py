"""Plan state beyond the params: BatchNorm's running statistics and Adam's moments,
checked step by step against eager PyTorch in training mode and torch.optim."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

from gridfl import CompileError

from .eager import assert_close

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from gridfl.compiler import (  # noqa: E402
    SGD,
    Adam,
    AdamW,
    compile_evaluation_plan,
    compile_training_plan,
    model_tensors,
)


class Block(nn.Module):
    """A basic residual block: conv-BN-ReLU-conv-BN plus the input, ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


def small_resnet(c: int = 4) -> nn.Module:
    """Two residual blocks on CIFAR-shaped input (3x32x32), kept tiny for the CPU."""
    return nn.Sequential(
        nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        Block(c), Block(c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10),
    )


def cifar_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def run_plan(plan, tensors, state, X, y, lr):
    """One step; returns loss, the new model tensors (params + buffers) and opt state."""
    n_model = plan.num_params + plan.num_buffers
    out = plan.execute(*plan.bind(data=X, target=y, params=tensors, optimizer_state=state,
                                  client_config={"lr": lr}))
    head = len(out) - n_model - plan.num_optimizer_state
    return out[0], out[head:head + n_model], out[head + n_model:]


def steps_side_by_side(plan, tensors, ref, opt, g, lr, steps=20):
    """``steps`` plan steps (optimizer state from zeros) and torch.optim steps on the same
    random batches of 6 x 12 features, losses compared each step; returns the plan's
    final model tensors and optimizer state."""
    state: list = []  # bind() starts the state at zeros
    for step in range(steps):
        X, y = torch.randn(6, 12, generator=g), torch.randint(0, 5, (6,), generator=g)
        loss, tensors, state = run_plan(plan, tensors, state, X, y, lr)
        opt.zero_grad()
        ref_loss = nn.functional.cross_entropy(ref(X), y)
        ref_loss.backward()
        opt.step()
        assert_close(loss, float(ref_loss.detach()), rtol=1e-4, what=f"loss {step}")
    return tensors, state


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = small_resnet()
    X, y = cifar_batch(8, 0)
    plan = compile_training_plan(model, optimizer=SGD(lr=0.05, momentum=0.9),
                                 example_data=X, example_target=y)
    return model, plan


def test_resnet_plan_carries_running_stats(resnet):
    model, plan = resnet
    assert plan.num_params == len(list(model.parameters()))
    assert plan.num_buffers == len(list(model.buffers())) == 5 * 3
    roles = [s.role for s in plan.outputs]
    assert roles.count("model_buffer") == 15
    counts = [s for s in plan.inputs if s.role == "model_buffer" and s.shape == ()]
    assert len(counts) == 5 and all(s.dtype == np.int64 for s in counts)
    assert [t.shape for t in model_tensors(model)] == [
        tuple(p.shape) for p in (*model.parameters(), *model.buffers())]


def test_resnet_batch_norms_run_as_one_affine_pass_each_way(resnet):
    """Each BatchNorm normalizes, and gets its input gradient, through one
    ``BatchNormalization`` node (a per-channel affine), not torch's chain of ``Mul``s."""
    _, plan = resnet
    graph = onnx.load_from_string(plan.to_bytes()).graph
    affine = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(affine) == 2 * 5, [n.name for n in affine]


def test_resnet_trains_like_eager_train_mode(resnet):
    model, plan = resnet
    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    tensors = model_tensors(model)
    state = [np.zeros_like(p) for p in tensors[:plan.num_params]]
    for step in range(20):
        X, y = cifar_batch(8 if step % 3 else 5, 100 + step)  # another batch size too
        loss, tensors, state = run_plan(plan, tensors, state, X, y, 0.05)
        opt.zero_grad()
        ref_loss = nn.functional.cross_entropy(ref(X), y)
        ref_loss.backward()
        opt.step()
        assert_close(loss, float(ref_loss.detach()), rtol=1e-4, what=f"loss {step}")
    want = [t.detach().numpy() for t in (*ref.parameters(), *ref.buffers())]
    for i, (got, w) in enumerate(zip(tensors, want, strict=True)):
        assert got.dtype == w.dtype
        assert_close(got, w, rtol=1e-3, atol=1e-5, what=f"tensor {i} after 20 steps")
    assert int(tensors[-1]) == 20  # num_batches_tracked


def _offset_features() -> nn.Module:
    """BatchNorm over features whose mean (about 40) dwarfs their spread, where the
    normalization's rounding shows most."""
    lin = nn.Linear(12, 8)
    with torch.no_grad():
        lin.bias.fill_(40.0)
    return nn.Sequential(lin, nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))


BATCH_NORMS = {
    "1d over features": lambda: nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                              nn.Linear(8, 5)),
    "1d over a sequence": lambda: nn.Sequential(nn.Unflatten(1, (3, 4)), nn.BatchNorm1d(3),
                                                nn.Flatten(), nn.Linear(12, 5)),
    "2d without affine": lambda: nn.Sequential(nn.Unflatten(1, (3, 2, 2)),
                                               nn.BatchNorm2d(3, affine=False), nn.Tanh(),
                                               nn.Flatten(), nn.Linear(12, 5)),
    "1d, offset features": _offset_features,
}


@pytest.mark.parametrize("name", list(BATCH_NORMS))
def test_batch_norm_variants_train_like_eager(name):
    """BatchNorm's plan forward and backward (a per-channel affine each) on every input
    rank it takes, with and without affine params, over 20 steps against torch."""
    torch.manual_seed(8)
    model = BATCH_NORMS[name]()
    g = torch.Generator().manual_seed(9)
    X0, y0 = torch.randn(6, 12, generator=g), torch.randint(0, 5, (6,), generator=g)
    plan = compile_training_plan(model, optimizer=SGD(lr=0.05), example_data=X0,
                                 example_target=y0)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    tensors, _ = steps_side_by_side(plan, model_tensors(model), ref, opt, g, 0.05)
    want = [t.detach().numpy() for t in (*ref.parameters(), *ref.buffers())]
    for i, (got, w) in enumerate(zip(tensors, want, strict=True)):
        assert_close(got, w, rtol=1e-4, atol=1e-5, what=f"{name} tensor {i}")


def test_evaluation_plan_uses_running_stats(resnet):
    model, _ = resnet
    X, y = cifar_batch(6, 7)
    plan = compile_evaluation_plan(model, example_data=X, example_target=y)
    assert model.training  # left as it was
    assert plan.num_buffers == 15
    tensors = model_tensors(model)
    # running statistics unlike the compile-time ones: the plan must read its inputs
    g = np.random.default_rng(0)
    n = plan.num_params
    for i, s in enumerate(plan.inputs[2 + n:]):
        if s.dtype == np.float32:
            tensors[n + i] = g.uniform(0.5, 1.5, tensors[n + i].shape).astype(np.float32)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for t, v in zip((*ref.parameters(), *ref.buffers()), tensors, strict=True):
            t.copy_(torch.from_numpy(v))
    ref.eval()
    want = nn.functional.cross_entropy(ref(X), y)
    loss, _ = plan.execute(X, y, *tensors)
    assert_close(loss, float(want.detach()), rtol=1e-5, what="eval loss")


@pytest.mark.parametrize("make, torch_cls", [
    (lambda: Adam(lr=0.01), torch.optim.Adam),
    (lambda: Adam(lr=0.01, weight_decay=0.1, betas=(0.8, 0.99)), torch.optim.Adam),
    (lambda: AdamW(lr=0.01), torch.optim.AdamW),
    (lambda: AdamW(lr=0.01, weight_decay=0.2, eps=1e-6), torch.optim.AdamW),
])
def test_adam_matches_torch_over_20_steps(make, torch_cls):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    g = torch.Generator().manual_seed(5)
    X0, y0 = torch.randn(6, 12, generator=g), torch.randint(0, 5, (6,), generator=g)
    opt_spec = make()
    plan = compile_training_plan(model, optimizer=opt_spec, example_data=X0, example_target=y0)
    n = len(list(model.parameters()))
    assert plan.num_optimizer_state == 2 * n + 1
    ref = copy.deepcopy(model)
    opt = torch_cls(ref.parameters(), lr=opt_spec.lr, betas=opt_spec.betas,
                    eps=opt_spec.eps, weight_decay=opt_spec.weight_decay)
    tensors, state = steps_side_by_side(plan, model_tensors(model), ref, opt, g,
                                        opt_spec.lr)
    for i, (got, p) in enumerate(zip(tensors, ref.parameters(), strict=True)):
        assert_close(got, p.detach().numpy(), rtol=1e-4, atol=1e-6, what=f"param {i}")
        st = opt.state[p]
        assert_close(state[i], st["exp_avg"].numpy(), rtol=1e-4, atol=1e-7, what="exp_avg")
        assert_close(state[n + i], st["exp_avg_sq"].numpy(), rtol=1e-4, atol=1e-9,
                     what="exp_avg_sq")
    assert float(state[-1]) == 20.0


def test_torch_adam_instance_is_read():
    m = nn.Linear(3, 2)
    from gridfl.compiler.optim import as_optimizer

    got = as_optimizer(torch.optim.AdamW(m.parameters(), lr=0.3, betas=(0.5, 0.6),
                                         eps=1e-5, weight_decay=0.7))
    assert got == AdamW(lr=0.3, betas=(0.5, 0.6), eps=1e-5, weight_decay=0.7)
    with pytest.raises(CompileError, match="amsgrad"):
        as_optimizer(torch.optim.Adam(m.parameters(), amsgrad=True))
    with pytest.raises(CompileError, match="betas"):
        Adam(betas=(1.0, 0.9))


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(x.shape[0])
        return self.lin(x)


def test_buffer_changed_in_eval_mode_is_refused_by_name():
    m = Counter().eval()
    with pytest.raises(CompileError, match=r"buffer 'seen' changes during the step"):
        compile_training_plan(m, example_data=torch.randn(4, 4),
                              example_target=torch.randint(0, 3, (4,)))
    assert float(m.seen) == 0.0  # left as it was


def test_nesterov_sgd_matches_torch_over_20_steps():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    g = torch.Generator().manual_seed(7)
    X0, y0 = torch.randn(6, 12, generator=g), torch.randint(0, 5, (6,), generator=g)
    spec = SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    plan = compile_training_plan(model, optimizer=spec, example_data=X0, example_target=y0)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=0.01)
    tensors, state = steps_side_by_side(plan, model_tensors(model), ref, opt, g, 0.05)
    for i, (got, p) in enumerate(zip(tensors, ref.parameters(), strict=True)):
        assert_close(got, p.detach().numpy(), rtol=1e-4, atol=1e-6, what=f"param {i}")
        assert_close(state[i], opt.state[p]["momentum_buffer"].numpy(), rtol=1e-4,
                     atol=1e-6, what=f"momentum {i}")
