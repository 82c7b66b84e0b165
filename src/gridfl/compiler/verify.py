"""A compiled plan checked against eager PyTorch, at the example batch size and another."""

from __future__ import annotations

import numpy as np
import torch

from gridfl._exceptions import CompileError
from gridfl.plan import Plan

__all__ = ["disagreement", "other_batch", "resize_batch", "verify_plan"]


def resize_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    idx = torch.arange(n) % t.shape[0]
    return t[idx].contiguous()


def other_batch(args, input_roles, batch_inputs):
    n = args[batch_inputs[0]].shape[0]
    other = n - 1 if n > 2 else n + 1
    args2 = list(args)
    for i in batch_inputs:
        args2[i] = resize_batch(args[i], other)
    for i, d in enumerate(input_roles):
        if d["role"] == "batch_size":  # keep its shape: PySyft passes tensor([64.0])
            args2[i] = torch.full_like(args[i], float(other))
    return args2


def verify_plan(plan: Plan, args, ref, other, batch_inputs) -> None:
    checks = [(list(args), ref)]
    if batch_inputs and other is not None:
        checks.append(other)
    for run_args, expected in checks:
        got = plan.execute(*run_args)
        for slot, g, r in zip(plan.outputs, got, expected, strict=True):
            err = disagreement(g, r.numpy())
            if err is not None:
                raise CompileError(
                    f"the compiled plan disagrees with eager PyTorch on output "
                    f"{slot.describe()} (max abs error {err}, batch "
                    f"{run_args[batch_inputs[0]].shape[0] if batch_inputs else '-'})"
                )


def disagreement(got: np.ndarray, ref: np.ndarray) -> float | str | None:
    """None when a plan's output matches eager PyTorch's (non-finite references are not
    compared), else the max abs error or "shape"."""
    if not np.all(np.isfinite(ref)):
        return None
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    if got.shape == ref.shape and np.allclose(got, ref, rtol=1e-3, atol=1e-5 * scale):
        return None
    return float(np.max(np.abs(got - ref))) if got.shape == ref.shape else "shape"
