"""Partitioners: how a dataset's examples are dealt to N virtual clients.

Each returns one array of example indices per client (int64, no index twice):

* :func:`iid`: a seeded shuffle dealt into equal shards;
* :func:`shards`: McMahan et al. (2017)'s pathological non-IID split (sort by label, cut
  into ``num_clients * shards_per_client`` shards, deal them at random);
* :func:`dirichlet`: Hsu et al. (2019): each client draws its class proportions
  ``q ~ Dir(alpha * p)``, ``p`` the dataset's class distribution, then its examples from
  the classes in those proportions (small ``alpha``: few classes per client; large: IID);
* a user function ``f(labels, num_clients, rng) -> list of index arrays`` (see
  :func:`partition`).

Example::

    >>> import numpy as np
    >>> labels = np.repeat(np.arange(10), 100)
    >>> parts = dirichlet(labels, num_clients=20, alpha=0.5, seed=0)
    >>> len(parts), sum(len(p) for p in parts)
    (20, 1000)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gridfl._exceptions import ConfigError
from gridfl.datasets import split_iid, split_noniid

__all__ = ["PARTITIONERS", "dirichlet", "iid", "partition", "shards"]

Partitioner = Callable[[np.ndarray, int, np.random.Generator], Sequence[Any]]


def _check_clients(num_clients: int, num_examples: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"the number of clients must be a positive integer, got {num_clients!r}")
    if num_clients > num_examples:
        raise ConfigError(
            f"{num_clients} clients are more than the {num_examples} examples: every client "
            "needs at least one; use fewer clients or more data"
        )


def iid(labels: np.ndarray, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    """Equal random shards (the ``num_examples % num_clients`` left over are unused)."""
    _check_clients(num_clients, len(labels))
    return split_iid(len(labels), num_clients, seed=seed)


def shards(
    labels: np.ndarray, num_clients: int, *, shards_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """McMahan et al.'s label-sorted shards, ``shards_per_client`` per client."""
    _check_clients(num_clients, len(labels))
    if shards_per_client < 1:
        raise ConfigError(f"shards_per_client must be at least 1, got {shards_per_client}")
    return split_noniid(labels, num_clients, shards_per_client=shards_per_client, seed=seed)


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    examples_per_client: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Hsu et al. (2019): client ``k`` has class proportions ``q_k ~ Dir(alpha * p)``.

    Every client gets ``examples_per_client`` examples (default: all examples dealt
    evenly), drawn without replacement: its class counts are multinomial in ``q_k``, and
    when a class runs out its share goes to the classes left, in ``q_k``'s proportions.
    """
    if not (isinstance(alpha, int | float) and not isinstance(alpha, bool)) or not alpha > 0:
        raise ConfigError(f"the Dirichlet alpha must be a number > 0, got {alpha!r}")
    _check_clients(num_clients, len(labels))
    size = examples_per_client or len(labels) // num_clients
    if size < 1 or size * num_clients > len(labels):
        raise ConfigError(
            f"{num_clients} clients x {size} examples do not fit {len(labels)} examples"
        )
    rng = np.random.default_rng(seed)
    classes, codes = np.unique(labels, return_inverse=True)
    pools = [rng.permutation(np.flatnonzero(codes == c)) for c in range(len(classes))]
    taken = np.zeros(len(classes), dtype=np.int64)
    left = np.array([len(p) for p in pools], dtype=np.int64)
    prior = left / left.sum()
    out = []
    for _ in range(num_clients):
        q = rng.dirichlet(alpha * prior)
        counts = np.zeros(len(classes), dtype=np.int64)
        need = size
        while need:
            open_ = left - counts > 0
            weights = np.where(open_, q, 0.0)
            # q can put (numerically) all its mass on exhausted classes: fall back on
            # the classes left, in proportion to what they hold
            weights = weights if weights.sum() > 0 else (left - counts) * open_
            draw = rng.multinomial(need, weights / weights.sum())
            draw = np.minimum(draw, left - counts)
            counts += draw
            need -= int(draw.sum())
        idx = [pools[c][taken[c] : taken[c] + n] for c, n in enumerate(counts) if n]
        taken += counts
        left -= counts
        out.append(rng.permutation(np.concatenate(idx)))
    return out


#: partitioner names for :func:`partition` and ``gridfl simulate --partitioner``
PARTITIONERS = ("iid", "shards", "dirichlet")
_OPTIONS = {"iid": set(), "shards": {"shards_per_client"},
            "dirichlet": {"alpha", "examples_per_client"}}


def partition(
    labels: Any,
    num_clients: int,
    method: str | Partitioner = "iid",
    *,
    seed: int = 0,
    **options: Any,
) -> list[np.ndarray]:
    """Split by name (``"iid"``, ``"shards"``, ``"dirichlet"`` with ``alpha=...``) or by a
    user function ``f(labels, num_clients, rng)``; the result is checked either way.

    >>> import numpy as np
    >>> parts = partition(np.arange(10) % 2, 5, lambda y, n, rng: np.array_split(
    ...     rng.permutation(len(y)), n))
    >>> [len(p) for p in parts]
    [2, 2, 2, 2, 2]
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        labels = labels.reshape(len(labels), -1)
        labels = labels.argmax(axis=1) if labels.shape[1] > 1 else labels[:, 0]
    if callable(method):
        _check_clients(num_clients, len(labels))
        parts = list(method(labels, num_clients, np.random.default_rng(seed), **options))
        return check_parts(parts, num_clients, len(labels))
    allowed = _OPTIONS.get(method) if isinstance(method, str) else None
    if allowed is not None and set(options) - allowed:
        raise ConfigError(
            f"the {method} partitioner takes no option {sorted(set(options) - allowed)}; "
            f"it takes {sorted(allowed) or 'none'}"
        )
    if method == "iid":
        parts = iid(labels, num_clients, seed=seed, **options)
    elif method == "shards":
        parts = shards(labels, num_clients, seed=seed, **options)
    elif method == "dirichlet":
        if "alpha" not in options:
            raise ConfigError("the dirichlet partitioner needs alpha (e.g. alpha=0.5)")
        parts = dirichlet(labels, num_clients, seed=seed, **options)
    else:
        raise ConfigError(
            f"unknown partitioner {method!r}: choose one of {', '.join(PARTITIONERS)} "
            "or pass a function f(labels, num_clients, rng)"
        )
    return check_parts(parts, num_clients, len(labels))


def check_parts(parts: Sequence[Any], num_clients: int, num_examples: int) -> list[np.ndarray]:
    """Index arrays as int64; refuse a wrong count, an empty client, a bad or repeated index."""
    if len(parts) != num_clients:
        raise ConfigError(f"the partitioner returned {len(parts)} clients, not {num_clients}")
    out = [np.asarray(p).reshape(-1) for p in parts]
    for k, p in enumerate(out):
        if p.size == 0:
            raise ConfigError(f"the partitioner gave client {k} no examples")
        if p.dtype.kind not in "iu":
            raise ConfigError(f"client {k}'s indices are {p.dtype}, not integers")
        if p.min() < 0 or p.max() >= num_examples:
            raise ConfigError(f"client {k} has indices outside 0..{num_examples - 1}")
    flat = np.concatenate(out)
    if len(np.unique(flat)) != len(flat):
        raise ConfigError("the partitioner gave some examples to more than one client")
    return [p.astype(np.int64, copy=False) for p in out]
