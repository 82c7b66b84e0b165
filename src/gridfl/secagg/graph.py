"""The SecAgg+ neighbour graph (Bell et al. 2020): workers on a randomly shuffled ring,
each joined to the ``degree/2`` nearest on each side (a Harary graph of even degree).

With ``degree = n - 1`` (plain SecAgg) every worker neighbours every other. The graph is
symmetric by construction, so "u masks with v" and "v masks with u" always agree.

    >>> g = neighbour_graph(["a", "b", "c", "d", "e"], degree=2)
    >>> sorted(len(v) for v in g.values())
    [2, 2, 2, 2, 2]
    >>> all(u in g[v] for u in g for v in g[u])
    True
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence


def neighbour_graph(ids: Sequence[str], degree: int) -> dict[str, frozenset[str]]:
    """Each id's neighbours (itself excluded) in a random ring of even ``degree``;
    ``degree >= len(ids) - 1`` gives the complete graph."""
    n = len(ids)
    if n <= 1 or degree >= n - 1:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    if degree % 2:
        raise ValueError("the ring graph has an even degree")
    ring = list(ids)
    secrets.SystemRandom().shuffle(ring)
    half = degree // 2
    return {
        u: frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d != 0)
        for i, u in enumerate(ring)
    }
