"""
What a worker keeps between cycles, per FL process: the model buffers it does not send
(BatchNorm statistics in FedBN mode) and, when the process asks for it, the optimizer
state.

A process chooses in its ``client_config``:

* ``"buffers"``: ``"aggregate"`` (default; the buffers are reported in the diff and
  averaged like params) or ``"local"`` (FedBN, Li et al. 2021: each worker keeps its own
  BatchNorm statistics; the diff carries zeros for them);
* ``"keep_optimizer_state"``: ``false`` (default; Adam's moments or SGD momentum start at
  zero each cycle) or ``true`` (continue from the state the last cycle ended with).

Every :class:`~gridfl.Syft` client has a :class:`LocalState`, in memory unless it is
given a directory (``Syft(url, local_state_dir="...")``), where each process's state is
one ``.npz`` file, written atomically and read without pickle::

    >>> store = LocalState()
    >>> store.save("mnist:1.0", buffers=[np.zeros(3, np.float32)])
    >>> [b.shape for b in store.load("mnist:1.0").buffers]
    [(3,)]
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gridfl._exceptions import ConfigError

__all__ = ["BUFFER_MODES", "Kept", "LocalState", "read_local_options"]

#: ``client_config["buffers"]`` values.
BUFFER_MODES = ("aggregate", "local")


@dataclass
class Kept:
    """One process's kept state (empty lists: nothing kept yet)."""

    buffers: list[np.ndarray] = field(default_factory=list)
    optimizer_state: list[np.ndarray] = field(default_factory=list)


def read_local_options(client_config: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(local_buffers, keep_optimizer_state)`` from a process's client_config."""
    mode = client_config.get("buffers", "aggregate")
    if mode not in BUFFER_MODES:
        raise ConfigError(
            f"client_config buffers must be one of {', '.join(BUFFER_MODES)}, got {mode!r}"
        )
    keep = client_config.get("keep_optimizer_state", False)
    if not isinstance(keep, bool):
        raise ConfigError(f"client_config keep_optimizer_state must be a bool, got {keep!r}")
    return mode == "local", keep


class LocalState:
    """Per-process worker state, in memory or under ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, Kept] = {}
        self._lock = threading.Lock()

    def _path(self, process: str) -> Path:
        assert self.directory is not None
        return self.directory / (hashlib.sha256(process.encode()).hexdigest()[:32] + ".npz")

    def load(self, process: str) -> Kept:
        """The state kept for ``process`` (copies; empty when there is none)."""
        with self._lock:
            if self.directory is None:
                kept = self._memory.get(process, Kept())
                return Kept([a.copy() for a in kept.buffers],
                            [a.copy() for a in kept.optimizer_state])
            path = self._path(process)
            if not path.exists():
                return Kept()
            try:
                with np.load(path, allow_pickle=False) as z:
                    names = sorted(z.files)
                    return Kept(
                        [z[n] for n in _numbered(names, "buffer_")],
                        [z[n] for n in _numbered(names, "opt_")],
                    )
            except Exception as exc:
                raise ConfigError(f"local state file {path} cannot be read: {exc}") from exc

    def save(
        self,
        process: str,
        *,
        buffers: Sequence[np.ndarray] | None = None,
        optimizer_state: Sequence[np.ndarray] | None = None,
    ) -> None:
        """Replace what is kept for ``process`` (``None`` leaves that part as it was)."""
        old = self.load(process)
        kept = Kept(
            old.buffers if buffers is None else [np.array(a, copy=True) for a in buffers],
            old.optimizer_state if optimizer_state is None
            else [np.array(a, copy=True) for a in optimizer_state],
        )
        with self._lock:
            if self.directory is None:
                self._memory[process] = kept
                return
            arrays = {f"buffer_{i}": a for i, a in enumerate(kept.buffers)}
            arrays.update({f"opt_{i}": a for i, a in enumerate(kept.optimizer_state)})
            buf = io.BytesIO()
            np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwds
            path = self._path(process)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(buf.getvalue())
                os.replace(tmp, path)  # a crash leaves the old file or the new one
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def clear(self, process: str) -> None:
        """Forget what is kept for ``process``."""
        with self._lock:
            self._memory.pop(process, None)
            if self.directory is not None:
                self._path(process).unlink(missing_ok=True)


def _numbered(names: list[str], prefix: str) -> list[str]:
    found = [n for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return sorted(found, key=lambda n: int(n[len(prefix):]))
