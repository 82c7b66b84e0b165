"""Optimizers as pure update functions traced into the plan.

An optimizer's state (SGD momentum buffers, Adam's moments and step count) is carried as
extra plan inputs and outputs with role ``optimizer_state``; a worker starts them at
zero at each cycle (a worker's optimizer state is not aggregated), so every optimizer's
initial state is all zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gridfl._exceptions import CompileError

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "as_optimizer"]


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
        _check_positive("SGD", "lr", self.lr)
        if self.momentum < 0:
            raise CompileError(f"SGD momentum must be >= 0, got {self.momentum}")
        if self.weight_decay < 0:
            raise CompileError(f"SGD weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and self.momentum == 0:
            raise CompileError("SGD nesterov needs momentum > 0")

    def init_state(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The state before the first step: one zero momentum buffer per param."""
        return [torch.zeros_like(p) for p in params] if self.momentum else []

    def example_state(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The state the compiler verifies with (zero buffers, as a worker starts)."""
        return self.init_state(params)

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


@dataclass(frozen=True)
class Adam:
    """Adam, the same update as ``torch.optim.Adam`` (``amsgrad=False``).

    State, in plan order: the first moments (one per param), the second moments, then
    one step count (a float32 scalar). All start at zero. ``weight_decay`` adds
    ``weight_decay * p`` to the gradient (L2, as torch's Adam).

        >>> Adam(lr=1e-3)
        Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0)
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    #: decoupled weight decay (AdamW) instead of L2 in the gradient
    _decoupled = False

    def __post_init__(self):
        name = type(self).__name__
        _check_positive(name, "lr", self.lr)
        _check_positive(name, "eps", self.eps)
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise CompileError(f"{name} betas must be in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise CompileError(f"{name} weight_decay must be >= 0, got {self.weight_decay}")

    def init_state(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Zero first and second moments per param, and a zero step count."""
        zeros = [torch.zeros_like(p) for p in params]
        return [*zeros, *[z.clone() for z in zeros], torch.zeros((), dtype=torch.float32)]

    def example_state(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The state the compiler verifies with: a few steps in. At step 1 with zero
        moments the update is ``lr * g / (|g| + eps)``, which turns float rounding
        noise in gradients near zero into visible differences from eager PyTorch."""
        ones = [torch.full_like(p, 1e-4) for p in params]
        return [*[o * 0.0 for o in ones], *ones, torch.tensor(3.0)]

    def step(self, params, grads, lr, state):
        """Return ``(new_params, new_state)`` for state ``[m..., v..., step]``."""
        n = len(params)
        b1, b2 = self.betas
        t = state[2 * n] + 1.0
        bias1 = 1.0 - torch.pow(torch.tensor(b1), t)
        bias2_sqrt = torch.sqrt(1.0 - torch.pow(torch.tensor(b2), t))
        new_params, moments1, moments2 = [], [], []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if self.weight_decay:
                if self._decoupled:
                    p = p * (1.0 - lr * self.weight_decay)
                else:
                    g = g + self.weight_decay * p
            m = b1 * state[i] + (1.0 - b1) * g
            v = b2 * state[n + i] + (1.0 - b2) * g * g
            denom = (torch.sqrt(v) / bias2_sqrt + _unfoldable(self.eps, p)).reshape(p.shape)
            new_params.append(p - (lr / bias1) * (m / denom))
            moments1.append(m)
            moments2.append(v)
        return new_params, [*moments1, *moments2, t]


@dataclass(frozen=True)
class AdamW(Adam):
    """AdamW, the same update as ``torch.optim.AdamW``: decoupled weight decay
    ``p *= 1 - lr * weight_decay`` before the Adam step (default 0.01, as torch).

        >>> AdamW(lr=1e-3).weight_decay
        0.01
    """

    weight_decay: float = 1e-2
    _decoupled = True


Optimizer = SGD | Adam


def _unfoldable(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 1-element tensor of ``like``'s rank (at least 1). The ONNX export's
    rewriter matches scalar constants within 1e-8 of 0 as 0 and drops ``x + 1e-8``;
    it leaves non-scalar constants alone."""
    return torch.full([1] * max(like.dim(), 1), value, dtype=like.dtype)


def _check_positive(name: str, what: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise CompileError(f"{name} {what} must be a positive number, got {value!r}")


def _group(opt: torch.optim.Optimizer) -> dict:
    if len(opt.param_groups) != 1:
        raise CompileError(
            f"{type(opt).__name__} with {len(opt.param_groups)} param groups is not "
            "supported; use one group"
        )
    g = opt.param_groups[0]
    for flag in ("maximize", "amsgrad"):
        if g.get(flag, False):
            raise CompileError(f"{type(opt).__name__} with {flag}=True is not supported")
    return g


def as_optimizer(opt) -> Optimizer:
    """Accept :class:`SGD`, :class:`Adam`, :class:`AdamW`, ``None`` (plain SGD) or a
    ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` instance (its settings are copied)."""
    if opt is None:
        return SGD()
    if isinstance(opt, (SGD, Adam)):
        return opt
    if isinstance(opt, torch.optim.SGD):
        g = _group(opt)
        if g.get("dampening", 0):
            raise CompileError("torch.optim.SGD with dampening != 0 is not supported")
        return SGD(
            lr=float(g["lr"]),
            momentum=float(g.get("momentum", 0.0)),
            weight_decay=float(g.get("weight_decay", 0.0)),
            nesterov=bool(g.get("nesterov", False)),
        )
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        g = _group(opt)
        # torch >= 2.2 makes Adam(decoupled_weight_decay=True) an AdamW
        decoupled = isinstance(opt, torch.optim.AdamW) or bool(
            g.get("decoupled_weight_decay", False)
        )
        cls = AdamW if decoupled else Adam
        return cls(lr=float(g["lr"]), betas=(float(g["betas"][0]), float(g["betas"][1])),
                   eps=float(g["eps"]), weight_decay=float(g.get("weight_decay", 0.0)))
    raise CompileError(
        f"unsupported optimizer {type(opt).__name__}; use gridfl.compiler.SGD, Adam or "
        "AdamW, or torch.optim.SGD, Adam or AdamW"
    )
