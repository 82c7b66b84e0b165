"""The demo's ready data: MNIST dealt into the worker processes' shards, and the test set.

Loading MNIST (checking, decompressing and unpickling 17 MB) and writing ~200 MB of
shards took a second or two of every demo's start-up. They are kept in the data directory
under a key of everything they depend on (the MNIST file, the split's options, the
sources that split and write them), like compiled plans (:mod:`gridfl.plan_cache`): a
second demo with the same split reads the test set and hands the workers the shards
already there. A directory is written under a temporary name and renamed into place once
whole; its manifest records the key and every file's size, so a directory cut short or
written for another key is not used. The data directory keeps one set: writing a new one
removes the others. ::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from gridfl.demo.options import DemoOptions
    >>> ready = ReadyData.of(DemoOptions(data_dir=Path(tempfile.mkdtemp()), workers=2,
    ...                                  clients=4))
    >>> ready.complete(), ready.shard(1).name
    (False, 'shard-1')
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gridfl.datasets import MNIST_SHA256
from gridfl.plan_cache import key_digest, source_digest

if TYPE_CHECKING:
    from gridfl.datasets import Mnist
    from gridfl.demo.options import DemoOptions

__all__ = ["ReadyData"]

_PREFIX = "ready-"
_MANIFEST = "manifest.json"


def data_key(options: DemoOptions) -> dict[str, Any]:
    """What the shards and the test set depend on."""
    from gridfl import __version__

    return {
        "demo_data": 1,
        "mnist": MNIST_SHA256,
        "split": {"clients": options.clients, "iid": options.iid, "seed": options.seed,
                  "examples_per_client": options.examples_per_client,
                  "workers": options.workers},
        "versions": {"gridfl": __version__,
                     "gridfl_sources": source_digest("datasets.py", "demo/data.py",
                                                     "demo/worker.py")},
    }


@dataclass(frozen=True)
class ReadyData:
    """Where a demo's shards and test set live (whether or not they are written yet)."""

    directory: Path
    key: dict
    workers: int

    @classmethod
    def of(cls, options: DemoOptions) -> ReadyData:
        key = data_key(options)
        directory = options.data_dir / f"{_PREFIX}{key_digest(key)[:24]}"
        return cls(directory, key, options.workers)

    def shard(self, worker: int) -> Path:
        """The shard directory of worker process ``worker``."""
        return self.directory / f"shard-{worker}"

    def complete(self) -> bool:
        """Whether the directory holds every file of this key, whole."""
        try:
            manifest = json.loads((self.directory / _MANIFEST).read_text())
            return manifest["key"] == json.loads(json.dumps(self.key)) and all(
                (self.directory / name).stat().st_size == size
                for name, size in manifest["files"].items()
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        return np.load(self.directory / "x_test.npy"), np.load(self.directory / "y_test.npy")

    def write(self, mnist: Mnist, options: DemoOptions) -> None:
        """Deal ``mnist`` into the shards and save the test set, then put them in place
        (removing any other set in the data directory)."""
        from gridfl.datasets import split_iid, split_noniid
        from gridfl.demo.worker import write_shard

        if options.iid:
            shards = split_iid(len(mnist.y_train), options.clients, seed=options.seed)
        else:
            shards = split_noniid(mnist.y_train, options.clients, seed=options.seed)
        if options.examples_per_client:
            shards = [s[: options.examples_per_client] for s in shards]
        parent = self.directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{_PREFIX}"))
        try:
            for w in range(self.workers):
                mine = shards[w :: self.workers]
                write_shard(tmp / f"shard-{w}",
                            [(mnist.x_train[idx], mnist.y_train[idx]) for idx in mine])
            np.save(tmp / "x_test.npy", mnist.x_test)
            np.save(tmp / "y_test.npy", mnist.y_test)
            files = {str(p.relative_to(tmp)): p.stat().st_size
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / _MANIFEST).write_text(json.dumps({"key": self.key, "files": files}))
            for old in [*parent.glob(f"{_PREFIX}*"), *parent.glob(f".{_PREFIX}*")]:
                if old != tmp:  # one set per data directory; crashed runs' halves
                    shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
