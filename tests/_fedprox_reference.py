"""FedProx in plain numpy, from Li et al., *Federated Optimization in Heterogeneous
Networks* (MLSys 2020), eq. 2: a worker minimises h(w) = F(w) + mu/2 ||w - w_t||^2, so
one SGD step is w <- w - lr * (grad F(w) + mu * (w - w_t)), with w_t the global params of
the round, fixed during it. F here is the mean cross-entropy of a 2NN
(Linear -> ReLU -> Linear), its gradient written out by hand (float64)."""

from __future__ import annotations

import numpy as np


def forward(params, x):
    w1, b1, w2, b2 = params
    h = np.maximum(x @ w1.T + b1, 0.0)
    return h, h @ w2.T + b2


def cross_entropy(logits, y) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def grad_f(params, x, y):
    """The gradient of the mean cross-entropy, by backpropagation."""
    w2 = params[2]
    h, logits = forward(params, x)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    d_logits = p / len(y)
    d_h = (d_logits @ w2) * (h > 0)
    return [d_h.T @ x, d_h.sum(axis=0), d_logits.T @ h, d_logits.sum(axis=0)]


def objective(params, global_params, x, y, mu) -> float:
    """h(w) = F(w) + mu/2 ||w - w_t||^2 over all params."""
    prox = sum(float(((p - g) ** 2).sum()) for p, g in zip(params, global_params, strict=True))
    return cross_entropy(forward(params, x)[1], y) + mu / 2 * prox


def fedprox_step(params, global_params, x, y, lr, mu):
    """w - lr * (grad F(w) + mu (w - w_t))."""
    grads = grad_f(params, x, y)
    return [p - lr * (gr + mu * (p - g))
            for p, gr, g in zip(params, grads, global_params, strict=True)]


def local_run(global_params, x, y, *, lr, mu, batch_size, steps):
    """``steps`` FedProx steps over consecutive batches (no shuffle), w_t fixed."""
    w = [np.asarray(p, np.float64) for p in global_params]
    anchor = [p.copy() for p in w]
    for s in range(steps):
        lo = s * batch_size
        w = fedprox_step(w, anchor, x[lo:lo + batch_size].astype(np.float64),
                         y[lo:lo + batch_size], lr, mu)
    return w


def compiled_two_nn(n: int, *, lr: float, mu: float, seed: int):
    """The system under test, built once here: a 6-5-3 2NN's FedProx plan (compiled by
    gridfl with torch), its initial params, and ``n`` samples of 6 features, 3 classes."""
    import torch

    from gridfl.compiler import SGD, compile_training_plan

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 3, n)
    plan = compile_training_plan(net, optimizer=SGD(lr=lr), example_data=x[:16],
                                 example_target=y[:16], proximal_mu=mu)
    return plan, [p.detach().numpy().copy() for p in net.parameters()], x, y
