"""The population's data on disk, memory-mapped: written once, read by index.

A :class:`ShardStore` directory holds ``arrays.json`` (where the examples are: ``x.npy``
and ``y.npy`` written there, or the arrays of an uncompressed ``.npz`` the caller gave,
mapped where they lie in it, so a large dataset is neither read nor copied),
``index.npy`` (every client's example indices, one after another) and ``offsets.npy``
(where each client's run starts; the last ``held_out`` share of a run is the client's
evaluation data). Worker processes open it with ``mmap_mode="r"`` and copy out only the
shard of the client they run, so memory grows with the data, not with the number of
clients or workers: the pages of the files are shared through the page cache.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> store = ShardStore.write(d, np.ones((6, 2)), np.arange(6), [np.array([0, 1, 2]),
...                          np.array([3, 4, 5])], held_out=0.0)
>>> x, y = store.train(1)
>>> y.tolist()
[3, 4, 5]
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gridfl._exceptions import ConfigError

__all__ = ["ShardStore"]


class ShardStore:
    """Read side of the store (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        self.directory = d
        arrays = json.loads((d / "arrays.json").read_text())
        self.x, self.y = _mapped(arrays["x"]), _mapped(arrays["y"])
        self.index = np.load(d / "index.npy", mmap_mode="r")
        self.offsets = np.load(d / "offsets.npy")  # N + 1 integers: small, read whole
        self.split = np.load(d / "split.npy")  # where each client's held-out part starts

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def write(
        cls,
        directory: str | Path,
        x: np.ndarray,
        y: np.ndarray,
        parts: Sequence[np.ndarray],
        *,
        held_out: float,
    ) -> ShardStore:
        """Write the examples and the clients' indices; ``held_out`` is the share of each
        client's examples kept for federated evaluation (at least one when > 0)."""
        if not 0 <= held_out < 1:
            raise ConfigError(f"held_out must be in [0, 1), got {held_out}")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name, arr in (("x", x), ("y", y)):
            where = _location(arr)
            if where is None:  # in memory: written once, then mapped like the others
                np.save(d / f"{name}.npy", np.ascontiguousarray(arr))
                where = _location(np.load(d / f"{name}.npy", mmap_mode="r"))
            arrays[name] = where
        (d / "arrays.json").write_text(json.dumps(arrays))
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        np.save(d / "index.npy", np.concatenate(parts).astype(np.int64))
        np.save(d / "offsets.npy", offsets)
        evaluated = np.where(held_out > 0, np.maximum(1, np.floor(sizes * held_out)), 0)
        if held_out > 0 and (sizes - evaluated < 1).any():
            k = int(np.argmax(sizes - evaluated < 1))
            raise ConfigError(
                f"client {k} has {sizes[k]} examples: too few to hold out {held_out:.0%} "
                "for evaluation and train on the rest"
            )
        np.save(d / "split.npy", offsets[:-1] + sizes - evaluated.astype(np.int64))
        return cls(d)

    def _rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(self.index[lo:hi])
        return np.asarray(self.x[idx]), np.asarray(self.y[idx])

    def train(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``client``'s training examples (a copy of its rows)."""
        return self._rows(int(self.offsets[client]), int(self.split[client]))

    def held_out(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``client``'s evaluation examples (empty when nothing is held out)."""
        return self._rows(int(self.split[client]), int(self.offsets[client + 1]))

    def train_sizes(self) -> np.ndarray:
        return self.split - self.offsets[:-1]


def _location(arr: np.ndarray) -> dict | None:
    """Where a C-ordered memory map's bytes lie (file, offset), or None for other arrays."""
    if not isinstance(arr, np.memmap) or arr.filename is None or not arr.flags.c_contiguous:
        return None
    return {"file": str(arr.filename), "offset": int(arr.offset), "dtype": arr.dtype.str,
            "shape": list(arr.shape)}


def _mapped(where: dict) -> np.ndarray:
    return np.memmap(where["file"], dtype=np.dtype(where["dtype"]), mode="r",
                     offset=where["offset"], shape=tuple(where["shape"]))


def map_npz(path: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of an uncompressed ``.npz`` (``np.savez``) as read-only memory maps of
    the file itself, or None when one is compressed, Fortran-ordered or of objects."""
    found: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                return None
            f.seek(info.header_offset + 26)  # the local header's name and extra lengths
            name_len, extra_len = np.frombuffer(f.read(4), "<u2")
            f.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if fortran or dtype.hasobject:
                return None
            found[info.filename[:-4]] = np.memmap(path, dtype=dtype, mode="r",
                                                  offset=f.tell(), shape=shape)
    return found
