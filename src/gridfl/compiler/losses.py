"""Standard losses and the accuracy metric, written with ops that export cleanly.

Every loss takes ``(output, target, batch_size)`` and divides by the ``batch_size``
plan input (PyGrid convention), so ``batch_size = len(X)`` gives PyTorch's ``mean``.
"""

from __future__ import annotations

import torch

from gridfl._exceptions import CompileError

__all__ = ["LOSSES", "accuracy", "get_loss"]


def _onehot(target: torch.Tensor, num_classes: int, dtype) -> torch.Tensor:
    classes = torch.arange(num_classes, dtype=target.dtype)
    return (target.unsqueeze(1) == classes).to(dtype)


def cross_entropy(output, target, batch_size):
    """Cross-entropy with class-index targets (int64, shape (N,)): ``F.cross_entropy``."""
    logp = torch.log_softmax(output, dim=1)
    onehot = _onehot(target, output.shape[1], output.dtype)
    return -(onehot * logp).sum() / batch_size


def cross_entropy_onehot(output, target, batch_size):
    """Cross-entropy with one-hot (or probability) float targets of shape (N, C)."""
    logp = torch.log_softmax(output, dim=1)
    return -(target * logp).sum() / batch_size


def mse(output, target, batch_size):
    """Mean squared error over all elements: ``F.mse_loss`` (mean)."""
    per_sample = output[0].numel()
    return ((output - target) ** 2).sum() / (batch_size * per_sample)


LOSSES = {
    "cross_entropy": cross_entropy,
    "cross_entropy_onehot": cross_entropy_onehot,
    "mse": mse,
}


def get_loss(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise CompileError(
            f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}"
        ) from None


def accuracy(output, target, batch_size, loss: str):
    """Fraction of samples whose argmax matches the target, a float in [0, 1].

    Returns ``None`` when it is meaningless (MSE on a single output column).
    """
    if output.dim() != 2 or output.shape[1] < 2:
        return None
    pred = torch.argmax(output, dim=1)
    truth = target if loss == "cross_entropy" else torch.argmax(target, dim=1)
    return (pred == truth).to(output.dtype).sum() / batch_size
