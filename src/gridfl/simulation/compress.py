"""Compressed reports in a simulation: each virtual client encodes its diff as a gridfl
worker does for ``server_config.compression`` (float16, int8, or top-k with the client's
own error-feedback residual carried across its rounds), and the coordinator decodes it
with the node's own :func:`gridfl.compression.decode`, so the fold is the node's.

    >>> import numpy as np
    >>> from gridfl.server.aggregate import ModelSpec
    >>> c = SimulatedCompression({"kind": "topk", "fraction": 0.5},
    ...                          ModelSpec.of([np.zeros(4, np.float32)]))
    >>> c.report(7, [np.array([3, 1, -2, 0], np.float32)])[0].tolist()
    [3.0, 0.0, -2.0, 0.0]
    >>> c.residual(7).tolist(), c.bytes_sent
    ([0.0, 1.0, 0.0, 0.0], 20)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gridfl import compression
from gridfl.server import aggregate as agg


class SimulatedCompression:
    """One process's compression setting applied per virtual client. Top-k keeps one
    residual per client that has reported (the model's size each, in this process)."""

    def __init__(self, setting: dict[str, Any], spec: agg.ModelSpec) -> None:
        self.kind: str = setting["kind"]
        self.fraction: float | None = setting.get("fraction")
        self.spec = spec
        self.bytes_sent = 0  # payload bytes of every report encoded so far
        self._feedback: dict[int, compression.ErrorFeedback] = {}

    def residual(self, client: int) -> np.ndarray | None:
        """What the client's earlier top-k reports left out (flat), if any."""
        fb = self._feedback.get(client)
        return None if fb is None else fb.residual

    def report(self, client: int, diff: Sequence[np.ndarray]) -> compression.CompressedDiff:
        """The client's diff as the node decodes it from the compressed payload; raises
        :class:`~gridfl.InvalidRequestError` as the node would (its residual unchanged)."""
        if self.kind != "topk":
            payload = compression.encode(self.kind, diff)
            commit = None
        else:
            assert self.fraction is not None  # filled in by validate_config
            fb = self._feedback.get(client) or compression.ErrorFeedback(self.fraction)
            payload, residual = fb.compress(diff)
            commit = (fb, residual)
        decoded = compression.decode(self.kind, payload, self.spec.shapes, self.spec.dtypes,
                                     fraction=self.fraction)
        if commit is not None:  # accepted: the worker keeps its new residual
            fb, residual = commit
            fb.commit(residual)
            self._feedback[client] = fb
        self.bytes_sent += len(payload)
        return decoded
