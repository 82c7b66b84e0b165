"""The graph passes on a traced step (gridfl/compiler/trace.py): a ReLU before a max-pool
masks, and a conv bias sums, the pooled gradient instead of the full-size one, and the
step's gradients stay eager PyTorch's."""

from __future__ import annotations

import operator

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from gridfl.compiler.trace import trace_step  # noqa: E402

aten, gridfl_ops = torch.ops.aten, torch.ops.gridfl


def _conv_relu_pool_grads(x, w, b, r):
    y = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2)
    return torch.autograd.grad((y * r).sum(), (w, b))


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, 8, generator=g)
    x[:, :, :4, :4] = 0.0  # flat patches: windows of equal positive values (bias > 0)
    w = torch.randn(4, 2, 3, 3, generator=g)
    b = torch.tensor([0.5, -0.5, 0.25, 0.0])
    r = torch.randn(3, 4, 4, 4, generator=g)
    return [x, w, b, r]


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_relu_mask_and_bias_sum_read_the_pooled_gradient():
    args = _inputs()
    gm = trace_step(_conv_relu_pool_grads, args, grad_positions=[1, 2], batch_inputs=[0, 3])

    (mask,) = _calls(gm, gridfl_ops.threshold_backward.default)
    pooled = mask.args[1]
    assert pooled.target is operator.getitem and pooled.args[1] == 0
    assert pooled.args[0].target is gridfl_ops.max_pool2d.default
    (scatter,) = _calls(gm, gridfl_ops.max_pool2d_backward.default)
    assert scatter.args[0] is mask  # the mask runs before the scatter, k*k times smaller
    sums = {n.args[0] for n in _calls(gm, aten.sum.dim_IntList)}
    assert mask in sums and scatter not in sums  # the bias gradient: pooled, not scattered

    x, w, b, r = args
    want = _conv_relu_pool_grads(x, w.requires_grad_(True), b.requires_grad_(True), r)
    for g, e in zip(gm(x, w.detach(), b.detach(), r), want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_a_relu_read_past_the_pool_keeps_the_full_size_mask():
    """When the ReLU's output also reaches the loss another way, its gradient is more
    than the scatter: the mask stays full-size, and the step is still eager's."""

    def grads(x, w, b, r):
        a = F.relu(F.conv2d(x, w, b, padding=1))
        y = F.max_pool2d(a, 2)
        return torch.autograd.grad((y * r).sum() + a.mean(), (w, b))

    args = _inputs()
    gm = trace_step(grads, args, grad_positions=[1, 2], batch_inputs=[0, 3])
    (mask,) = _calls(gm, gridfl_ops.threshold_backward.default)
    assert mask.args[1].target is not operator.getitem  # the ReLU's output, full-size
    x, w, b, r = args
    want = grads(x, w.requires_grad_(True), b.requires_grad_(True), r)
    for g, e in zip(gm(x, w.detach(), b.detach(), r), want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_no_views_are_left():
    """Passes see the node that computes a value, not the ``alias``/``detach`` views
    autograd wraps it in."""
    gm = trace_step(_conv_relu_pool_grads, _inputs(), grad_positions=[1, 2],
                    batch_inputs=[0, 3])
    assert not _calls(gm, aten.alias.default) + _calls(gm, aten.detach.default)


def test_a_plan_may_return_an_input_and_one_value_twice():
    """With the views gone an output can be an input, or another output, itself: the
    exported plan still returns each under its own name."""
    from gridfl.compiler import compile_plan

    def step(X, y, batch_size, lr, W, b):
        loss = ((X @ W.t() + b - y) ** 2).mean()
        gW, _ = torch.autograd.grad(loss, (W, b))
        return loss, loss, W - lr * gW, b

    g = torch.Generator().manual_seed(1)
    args = [torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g),
            torch.tensor(4.0), torch.tensor(0.1), torch.randn(2, 3, generator=g),
            torch.randn(2, generator=g)]
    plan = compile_plan(step, args)  # verified against eager: the run below is its check
    X, y, n, lr, W, b = (a.numpy() for a in args)
    loss, again, new_W, same_b = plan.execute(X, y, n, lr, W, b)
    assert loss == again
    torch.testing.assert_close(torch.from_numpy(same_b), args[5])
    want = step(*args[:4], args[4].clone().requires_grad_(True),
                args[5].clone().requires_grad_(True))
    torch.testing.assert_close(torch.from_numpy(new_W), want[2].detach())
