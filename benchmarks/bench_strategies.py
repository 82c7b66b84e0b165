"""Aggregation strategies on the McMahan CNN (1,663,370 float32 params), side by side in
one run (``python -m benchmarks.bench_strategies [K]``): K reports (default 10) folded by an
in-process node per strategy. Reported per strategy: ms per report (decode, validate, fold
or keep, write), the completing report's ms (aggregate + checkpoint + state), and the peak
of Python/numpy allocations (tracemalloc) over the cycle, against the documented bound
(robust rules: max_diffs x params x 8 bytes on top of FedAvg's), and as a ratio to
FedAvg's.
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.bench_server import CNN_SHAPES, host_payload

STRATEGIES = [
    None,
    {"name": "fedadam", "eta": 0.01},
    {"name": "fedmedian"},
    {"name": "fedtrimmedavg", "beta": 0.2},
    {"name": "krum", "num_malicious_nodes": 2},
]


def run(strategy: dict | None, k: int, blobs: list[bytes]) -> dict:
    from gridfl import _messages
    from gridfl.server import GridNode, Settings

    name = strategy["name"] if strategy else "fedavg"
    with tempfile.TemporaryDirectory() as tmp:
        node = GridNode(Settings(data_dir=Path(tmp), admin_token="x"))
        payload = host_payload(name, k)
        payload["server_config"]["strategy"] = strategy
        node.host(payload)
        joined = []
        for _ in range(k):
            a = node.authenticate(_messages.AuthenticateRequest(model_name=name))
            c = node.cycle_request(_messages.CycleRequest(worker_id=a["worker_id"], model=name))
            joined.append((a["worker_id"], c["request_key"]))
        tracemalloc.start()
        times = []
        for (wid, key), blob in zip(joined, blobs, strict=True):
            t = time.perf_counter()
            node.report(_messages.ReportRequest(wid, key, blob))
            times.append(time.perf_counter() - t)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        node.close()
    return {
        "name": name,
        "fold_ms": 1000 * float(np.mean(times[:-1])),
        "complete_ms": 1000 * times[-1],
        "peak_mb": peak / 1e6,
    }


def main(argv=None) -> None:
    from gridfl import state

    argv = sys.argv[1:] if argv is None else argv
    k = int(argv[0]) if argv else 10
    rng = np.random.default_rng(0)
    blobs = [
        state.dumps([(0.01 * rng.standard_normal(s)).astype(np.float32) for s in CNN_SHAPES])
        for _ in range(k)
    ]
    params = sum(int(np.prod(s)) for s in CNN_SHAPES)
    bound = k * params * 8 / 1e6
    print(f"{k} CNN reports ({params:,} params); robust bound {bound:.0f} MB over fedavg")
    print(f"{'strategy':<14} {'ms/report':>9} {'complete ms':>11} {'peak MB':>8} {'vs fedavg':>9}")
    base = None
    for strategy in STRATEGIES:
        r = run(strategy, k, blobs)
        base = base or r["peak_mb"]
        print(
            f"{r['name']:<14} {r['fold_ms']:>9.1f} {r['complete_ms']:>11.1f} "
            f"{r['peak_mb']:>8.0f} {r['peak_mb'] / base:>8.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
