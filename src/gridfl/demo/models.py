"""The two MNIST models of McMahan et al. (2017), in PyTorch (host side only).

* ``cnn``: two 5x5 convolutions (32 and 64 channels, padding 2) each followed by ReLU and
  2x2 max-pooling, a 512-unit fully connected ReLU layer and 10 outputs: 1,663,370 params.
* ``2nn``: a multilayer perceptron with two hidden layers of 200 ReLU units: 199,210 params.
"""

from __future__ import annotations

from gridfl._exceptions import ConfigError

MODELS = ("cnn", "2nn")


def build_model(name: str, *, seed: int = 0):
    """Return a freshly initialised ``torch.nn.Module`` for ``name`` (``cnn`` or ``2nn``).

    Example::

        >>> model = build_model("cnn")
        >>> sum(p.numel() for p in model.parameters())
        1663370
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if name == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )
    if name == "2nn":
        return nn.Sequential(
            nn.Linear(784, 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, 10),
        )
    raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
