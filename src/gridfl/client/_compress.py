"""The worker's side of compressed reports: turn a diff's State bytes into the encoding
the node asked for (``server_config.compression``), keeping top-k's error feedback per
process across cycles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gridfl import compression, state
from gridfl._exceptions import ModelError


class Compressor:
    """Per-client compression state: one :class:`~gridfl.compression.ErrorFeedback` per
    process (name, version), so each process's residual is carried to its next report.

        >>> import numpy as np
        >>> from gridfl.state import dumps
        >>> c = Compressor()
        >>> payload, commit = c.compress({"kind": "topk", "fraction": 0.5}, ("m", "1"),
        ...                              dumps([np.array([4, 1], np.float32)]), [(2,)])
        >>> commit()
        >>> c.residual(("m", "1")).tolist()
        [0.0, 1.0]
    """

    def __init__(self) -> None:
        self._feedback: dict[tuple[str, str | None], compression.ErrorFeedback] = {}

    def residual(self, key: tuple[str, str | None]) -> np.ndarray | None:
        """What the process's earlier top-k reports left out (flat), if any."""
        fb = self._feedback.get(key)
        return None if fb is None else fb.residual

    def compress(
        self,
        setting: dict[str, Any],
        key: tuple[str, str | None],
        diff: bytes,
        shapes: Sequence[tuple[int, ...]],
    ) -> tuple[bytes, Callable[[], None]]:
        """``(payload, commit)``: ``commit()`` keeps top-k's new residual once the node
        accepted the report (a report that failed leaves the residual as it was)."""
        arrays = state.loads(diff)
        if [tuple(a.shape) for a in arrays] != [tuple(s) for s in shapes]:
            raise ModelError(
                "the diff's tensors do not match the model's shapes: "
                "make it with model.create_serialized_diff(params)"
            )
        kind = setting["kind"]
        if kind != "topk":
            return compression.encode(kind, arrays), lambda: None
        fraction = setting.get("fraction", compression.DEFAULT_FRACTION)
        fb = self._feedback.get(key)
        if fb is None or fb.fraction != fraction:
            fb = self._feedback[key] = compression.ErrorFeedback(fraction)
        payload, residual = fb.compress(arrays)
        return payload, lambda: fb.commit(residual)
