"""A worker process for the multi-cycle test: uses only the SDK (no torch).

    python worker_proc.py URL MODEL_NAME SEED

Trains on its own synthetic shard until the node has nothing left to train, then prints
one JSON line with its summary and whether torch was imported.
"""

from __future__ import annotations

import json
import sys

import numpy as np

FEATURES, CLASSES = 20, 4


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class blobs around fixed centres (the same centres for every shard)."""
    centres = np.random.default_rng(12345).normal(scale=1.5, size=(CLASSES, FEATURES))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    x = centres[y] + rng.normal(size=(n, FEATURES))
    return x.astype(np.float32), y.astype(np.int64)


def main(url: str, name: str, seed: int) -> None:
    from gridfl.client import run_worker

    x, y = blobs(400, seed)
    summary = run_worker(url, name, x, y, model_version="1.0", max_wait=0.25, min_wait=0.05,
                         seed=seed, max_errors=20)
    print(json.dumps({
        "cycles": summary.cycles,
        "rejections": summary.rejections,
        "errors": summary.errors,
        "finished": summary.finished,
        "losses": summary.losses,
        "torch_imported": "torch" in sys.modules,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
