"""The gridfl-compiled models the syft.js tests train (McMahan et al.'s 2NN and CNN), and
their expected steps: a numpy reference for the 2NN, eager PyTorch autograd for the CNN."""

from __future__ import annotations

import numpy as np

LR = 0.1
TOL = 1e-5  # the bound: syft.js and onnx agree within 1e-5


def reference_step(X, Y, params, lr):
    """One SGD step of the 2NN in float64: ``loss = -sum(Y * log_softmax(z)) / B``."""
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    W1, b1, W2, b2, W3, b3 = (p.astype(np.float64) for p in params)
    B = len(X)
    h1 = np.maximum(X @ W1.T + b1, 0)
    h2 = np.maximum(h1 @ W2.T + b2, 0)
    z = h2 @ W3.T + b3
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    loss = -(Y * logp).sum() / B
    acc = (z.argmax(1) == Y.argmax(1)).sum() / B
    dz = (np.exp(logp) - Y) / B
    dh2 = (dz @ W3) * (h2 > 0)
    dh1 = (dh2 @ W2) * (h1 > 0)
    grads = [dh1.T @ X, dh1.sum(0), dh2.T @ h1, dh2.sum(0), dz.T @ h2, dz.sum(0)]
    return loss, acc, [p - lr * g for p, g in zip((W1, b1, W2, b2, W3, b3), grads, strict=True)]


def compile_two_nn(mnist):
    """The 2NN's initial params and its training plan with the tfjs variant."""
    import torch

    from gridfl.compiler import SGD, compile_training_plan, model_tensors

    torch.manual_seed(21)
    net = torch.nn.Sequential(
        torch.nn.Linear(784, 200), torch.nn.ReLU(),
        torch.nn.Linear(200, 200), torch.nn.ReLU(),
        torch.nn.Linear(200, 10),
    )
    plan = compile_training_plan(net, loss="cross_entropy_onehot", optimizer=SGD(lr=LR),
                                 example_data=mnist.X[:16], example_target=mnist.y[:16],
                                 tfjs=True)
    assert plan.tfjs is not None
    return model_tensors(net), plan


def host_compiled(grid, compiled, max_diffs: int, batch_size: int = 64) -> str:
    """Host ``(params, plan)`` for one cycle of ``max_diffs`` reports."""
    params, plan = compiled
    return grid.host(
        server_config={"cycle_length": 600, "num_cycles": 1, "max_diffs": max_diffs},
        client_config={"batch_size": batch_size, "lr": LR, "max_updates": 1},
        params=params,
        plans={"training_plan": plan},
    )


class CompiledCnn:
    """The CNN (two 5x5 convolutions with 2x2 max-pooling, 512 units) compiled with its
    tfjs variant, on 8 MNIST images (their blank borders make max-pool windows of ties)."""

    def __init__(self, mnist):
        import torch
        from torch import nn

        from gridfl.compiler import SGD, compile_training_plan, model_tensors

        torch.manual_seed(7)
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(7 * 7 * 64, 512), nn.ReLU(), nn.Linear(512, 10),
        )
        self.X = mnist.X[:8].reshape(8, 1, 28, 28)
        self.Y = mnist.y[:8]
        self.plan = compile_training_plan(
            self.net, loss="cross_entropy_onehot", optimizer=SGD(lr=LR),
            example_data=self.X, example_target=self.Y, tfjs=True)
        self.params = model_tensors(self.net)

    def eager_step(self) -> tuple[float, list[np.ndarray]]:
        """Loss and SGD-updated params by eager PyTorch autograd on the 8 images."""
        import torch

        ws = [torch.tensor(p, requires_grad=True) for p in self.params]
        names = [n for n, _ in self.net.named_parameters()]
        out = torch.func.functional_call(self.net, dict(zip(names, ws, strict=True)),
                                         (torch.tensor(self.X),))
        loss = -(torch.tensor(self.Y) * torch.log_softmax(out, 1)).sum() / len(self.X)
        grads = torch.autograd.grad(loss, ws)
        return loss.item(), [(w - LR * g).detach().numpy() for w, g in zip(ws, grads,
                                                                           strict=True)]
