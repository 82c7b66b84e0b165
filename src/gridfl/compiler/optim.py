"""Optimizers as pure update functions traced into the plan.

An optimizer's state (SGD momentum buffers) is carried as extra plan inputs and
outputs with role ``optimizer_state``; a worker starts them at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gridfl._exceptions import CompileError

__all__ = ["SGD", "as_optimizer"]


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent, same update as ``torch.optim.SGD`` (dampening 0).

    ``lr`` is only the example value used while compiling: the plan reads the learning
    rate from its ``client_config`` input ``"lr"``. ``momentum``, ``weight_decay`` and
    ``nesterov`` are baked into the plan.

        >>> SGD(lr=0.1, momentum=0.9)
        SGD(lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False)
    """

    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        if self.lr <= 0:
            raise CompileError(f"SGD lr must be positive, got {self.lr}")
        if self.momentum < 0:
            raise CompileError(f"SGD momentum must be >= 0, got {self.momentum}")
        if self.weight_decay < 0:
            raise CompileError(f"SGD weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and self.momentum == 0:
            raise CompileError("SGD nesterov needs momentum > 0")

    @property
    def num_state(self) -> int:
        """Number of state tensors per parameter (1 with momentum, else 0)."""
        return 1 if self.momentum else 0

    def step(self, params, grads, lr, state):
        """Return ``(new_params, new_state)``; ``state`` is a list of momentum buffers.

        Zero buffers on the first step reproduce torch's first step exactly (it sets the
        buffer to the gradient, which equals ``momentum * 0 + gradient``).
        """
        new_params, new_state = [], []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                buf = self.momentum * state[i] + g
                new_state.append(buf)
                g = g + self.momentum * buf if self.nesterov else buf
            new_params.append(p - lr * g)
        return new_params, new_state


def as_optimizer(opt) -> SGD:
    """Accept :class:`SGD`, ``None`` (plain SGD) or a ``torch.optim.SGD`` instance."""
    if opt is None:
        return SGD()
    if isinstance(opt, SGD):
        return opt
    if isinstance(opt, torch.optim.SGD):
        g = opt.param_groups[0]
        if g.get("dampening", 0):
            raise CompileError("torch.optim.SGD with dampening != 0 is not supported")
        if g.get("maximize", False):
            raise CompileError("torch.optim.SGD with maximize=True is not supported")
        return SGD(
            lr=float(g["lr"]),
            momentum=float(g.get("momentum", 0.0)),
            weight_decay=float(g.get("weight_decay", 0.0)),
            nesterov=bool(g.get("nesterov", False)),
        )
    raise CompileError(
        f"unsupported optimizer {type(opt).__name__}; use gridfl.compiler.SGD or "
        "torch.optim.SGD"
    )
