"""Helpers of the compiler tests: eager torch reference steps, comparisons, and the
syft.js conformance vectors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests._vectors import VECTORS  # noqa: E402


def vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.exists():
        pytest.fail(f"interop vector {path} is missing")
    return path.read_bytes()


def eager_step(model, X, y, lr, *, loss="cross_entropy", momentum=0.0, steps=1):
    """Updated params (and losses) after ``steps`` torch.optim.SGD steps on one batch."""
    import copy

    import torch.nn.functional as F

    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = m(X)
        if loss == "cross_entropy":
            value = F.cross_entropy(out, y)
        elif loss == "cross_entropy_onehot":
            value = F.cross_entropy(out, y)  # float targets = class probabilities
        else:
            value = F.mse_loss(out, y)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    return losses, [p.detach().numpy() for p in m.parameters()]


def assert_close(got, expected, *, rtol=1e-4, atol=1e-6, what="value"):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol * scale, err_msg=what)
