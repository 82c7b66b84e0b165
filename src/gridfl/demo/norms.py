"""The demo's view of adaptive clipping: the update norms its workers reported.

The node clips each report and counts how many fit under the clip norm, but it keeps no
norm (it must not learn more about a worker than DP needs). The demo runs its own
workers, so each one writes, for every report the node took, when it sent it and the L2
norm of the diff it sent (:func:`record`). After the run the demo gives each norm to the
cycle whose open window (start to close, on the node's clock, the same machine's) holds
its sending time (:func:`by_cycle`), and puts the norms, their target quantile and the
clip norm the node used into each cycle's results.

    >>> import tempfile, pathlib
    >>> log = pathlib.Path(tempfile.mkdtemp()) / "norms-0"
    >>> record(log, 10.5, 2.0); record(log, 21.0, 3.0)
    >>> by_cycle([log], {1: (10.0, 11.0), 2: (20.0, 22.0)})
    {1: [2.0], 2: [3.0]}
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["by_cycle", "quantile", "record"]


def record(path: str | os.PathLike, sent_at: float, norm: float) -> None:
    """Append one report: its sending time (``time.time()``) and its diff's L2 norm."""
    with open(path, "a") as f:
        f.write(f"{sent_at!r} {norm!r}\n")


def by_cycle(
    paths: Iterable[str | os.PathLike], windows: Mapping[int, tuple[float, float]]
) -> dict[int, list[float]]:
    """The norms of every log in ``paths``, by the cycle (sequence -> (start, closed_at))
    whose window holds their sending time; a norm outside every window (a report to a
    cycle the demo did not take in) is left out."""
    out: dict[int, list[float]] = {seq: [] for seq in windows}
    spans = sorted((start, end, seq) for seq, (start, end) in windows.items())
    for path in paths:
        if not os.path.exists(path):  # a worker that never reported
            continue
        with open(path) as f:
            for line in f:
                sent_at, norm = (float(v) for v in line.split())
                for start, end, seq in spans:
                    if start <= sent_at <= end:
                        out[seq].append(norm)
                        break
    return {seq: sorted(norms) for seq, norms in out.items()}


def quantile(norms: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``norms`` (numpy's linear interpolation); None when empty.

    >>> quantile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.5
    """
    return float(np.quantile(norms, q)) if norms else None
