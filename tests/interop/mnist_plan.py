"""The MNIST training function of syft.js 0.1.4's test vectors, compiled into gridfl's onnx
plan variant (tests/vectors/README.md).

Compiling takes seconds (torch.onnx export), so syftjs_runner.py runs this file as a separate
process as soon as the interop tests are collected, in parallel with the first tests:

    python mnist_plan.py <vectors dir> <output file>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def mnist_train_step(X, y, batch_size, lr, W1, b1, W2, b2):
    """PyGrid signature ``(X, y, batch_size, lr, *params) -> (loss, acc, *params)``."""
    import torch

    logits = torch.relu(X @ W1.T + b1) @ W2.T + b2
    norm = logits - logits.max()  # one global max, not per row
    log_probs = norm - torch.log(torch.exp(norm).sum(dim=1, keepdim=True))
    loss = -(y * log_probs).sum() / batch_size
    grads = torch.autograd.grad(loss, [W1, b1, W2, b2])
    acc = (logits.argmax(1) == y.argmax(1)).float().sum() / batch_size
    updated = [p - lr * g for p, g in zip([W1, b1, W2, b2], grads, strict=True)]
    return (loss, acc, *updated)


def compile_mnist_plan(vectors: Path) -> bytes:
    """The onnx plan, compiled with the example batch and params of the vectors."""
    import json

    from gridfl import state
    from gridfl.compiler import compile_plan

    params = state.loads((vectors / "mnist_model_params.pb").read_bytes())
    X, y = state.loads((vectors / "mnist_batch_data.pb").read_bytes())
    scalars = json.loads((vectors / "scalars.json").read_text())
    example = (X, y, int(scalars["MNIST_BATCH_SIZE"]), scalars["MNIST_LR"], *params)
    return compile_plan(mnist_train_step, example).to_bytes()


if __name__ == "__main__":
    vectors_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    data = compile_mnist_plan(vectors_dir)
    tmp = out.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, out)
