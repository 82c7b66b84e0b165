"""
``SyftModel``: the model parameters a worker downloads, and the diff it reports.

    >>> import numpy as np
    >>> from gridfl.model import SyftModel
    >>> model = SyftModel([np.ones((2, 2), np.float32), np.zeros(2, np.float32)])
    >>> state = model.to_bytes()                       # syft-proto State bytes
    >>> same = SyftModel.from_bytes(state)             # what a worker does on download
    >>> trained = [p - 0.5 for p in same.params]
    >>> diff = same.create_serialized_diff(trained)    # State of original - trained
    >>> from gridfl.state import loads
    >>> loads(diff)[0].tolist()
    [[0.5, 0.5], [0.5, 0.5]]

Parameters may be numpy arrays or torch tensors (anything with
``.detach().cpu().numpy()`` or ``__array__``); torch is never imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gridfl._exceptions import ModelError
from gridfl.state import dumps, loads

__all__ = ["SyftModel"]


def _to_numpy(p: Any, index: int) -> np.ndarray:
    """numpy array of a parameter: numpy arrays, torch tensors (duck-typed), ``__array__``."""
    if isinstance(p, np.ndarray):
        return p
    detach = getattr(p, "detach", None)
    if callable(detach):  # a torch tensor, possibly requiring grad or on another device
        return np.asarray(detach().cpu().numpy())
    if hasattr(p, "__array__"):
        return np.asarray(p)
    raise TypeError(
        f"parameter {index}: expected a numpy array or a tensor, got {type(p).__name__}"
    )


class SyftModel:
    """Model parameters as held by a grid node: a list of numpy arrays, in model order.

    Build it from the State bytes the node serves with :meth:`from_bytes` (the usual
    way on a worker), or from a list of arrays with ``SyftModel(params)``.

    ``params`` are the model's own writable arrays. The values they had at construction
    are also kept as a private read-only snapshot, and :meth:`create_serialized_diff`
    subtracts from that snapshot, so training in place on ``params`` (for example
    through ``torch.from_numpy``) still yields the right diff.

        >>> import numpy as np
        >>> m = SyftModel([np.arange(3, dtype=np.float32)])
        >>> [p.shape for p in m.params]
        [(3,)]
    """

    __slots__ = ("_original", "params")

    def __init__(self, params: Sequence[Any]):
        """Build a model from parameters (numpy arrays or tensors); they are copied."""
        if isinstance(params, bytes | bytearray | memoryview):
            raise TypeError("SyftModel(params) takes arrays; use SyftModel.from_bytes(data)")
        if isinstance(params, np.ndarray) or not isinstance(params, Sequence):
            raise TypeError(
                f"SyftModel(params) takes a list of arrays, got {type(params).__name__}"
            )
        arrays = [np.array(_to_numpy(p, i), copy=True, order="C") for i, p in enumerate(params)]
        self._init(arrays)

    def _init(self, arrays: list[np.ndarray]) -> None:
        original = []
        for a in arrays:
            snap = a.copy()
            snap.flags.writeable = False
            original.append(snap)
        self._original: list[np.ndarray] = original
        self.params: list[np.ndarray] = arrays

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SyftModel:
        """Load a model from syft-proto ``State`` bytes (raises :class:`gridfl.StateError`).

        >>> import numpy as np
        >>> from gridfl.state import dumps
        >>> SyftModel.from_bytes(dumps([np.zeros((2, 3), np.float32)])).params[0].shape
        (2, 3)
        """
        model = cls.__new__(cls)
        model._init(loads(data))  # loads() returns fresh arrays: no extra copy needed
        return model

    def to_bytes(self) -> bytes:
        """Serialize the current ``params`` to syft-proto ``State`` bytes."""
        return dumps(self.params)

    def create_serialized_diff(self, updated_params: Sequence[Any]) -> bytes:
        """Return the ``State`` bytes of ``original - updated`` for every parameter.

        This is what a worker reports (base64-encoded) after training: PyGrid and
        syft.js define the diff as original minus updated, and the node applies
        ``new = current - aggregate(diffs)``. Raises :class:`gridfl.ModelError` when
        the count, a shape or a dtype does not match the model.

            >>> import numpy as np
            >>> m = SyftModel([np.ones(2, np.float32)])
            >>> from gridfl.state import loads
            >>> loads(m.create_serialized_diff([np.zeros(2, np.float32)]))[0].tolist()
            [1.0, 1.0]
        """
        if isinstance(updated_params, np.ndarray) or not isinstance(updated_params, Sequence):
            raise ModelError(
                f"updated params must be a list of {len(self._original)} arrays, "
                f"got {type(updated_params).__name__}"
            )
        if len(updated_params) != len(self._original):
            raise ModelError(
                f"expected {len(self._original)} parameters, got {len(updated_params)}"
            )
        diffs = []
        for i, (orig, upd) in enumerate(zip(self._original, updated_params, strict=True)):
            try:
                u = _to_numpy(upd, i)
            except TypeError as e:
                raise ModelError(str(e)) from None
            if u.shape != orig.shape:
                raise ModelError(f"parameter {i}: expected shape {orig.shape}, got {u.shape}")
            if u.dtype != orig.dtype:
                raise ModelError(f"parameter {i}: expected dtype {orig.dtype}, got {u.dtype}")
            if orig.dtype == np.bool_:
                raise ModelError(f"parameter {i}: cannot compute a diff of a bool parameter")
            diffs.append(np.subtract(orig, u))
        return dumps(diffs)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{p.dtype}{list(p.shape)}" for p in self.params)
        return f"SyftModel([{shapes}])"
