"""Run every benchmark: ``python -m benchmarks [name ...]`` (``make bench``).

Each benchmark measures gridfl side by side with its reference in the same run and
prints ratios; absolute times on a shared 2-core machine mean little on their own.
"""

from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = {
    "state": "benchmarks.bench_state",  # State codec vs numpy copy and naive protobuf
    "compile": "benchmarks.bench_compile",  # compile time: RNNs (Scan vs unrolled) vs the CNN
    "step": "benchmarks.bench_step",  # one training step: ONNX plan vs eager torch
    "server": "benchmarks.bench_server",  # grid node under concurrent simulated workers
    "worker": "benchmarks.bench_worker",  # a worker's CPU per cycle, phase by phase
    "strategies": "benchmarks.bench_strategies",  # CNN: fold, completion, memory per rule
    "demo_start": "benchmarks.bench_demo_start",  # a second 2NN demo: command to checkpoint
    "fl": "benchmarks.bench_fl",  # federated MNIST s/cycle vs compute floor, Flower alongside
    "dashboard": "benchmarks.bench_dashboard",  # 2NN demo s/cycle with and without a page open
    "simulation": "benchmarks.bench_simulation",  # memory at N=100 vs N=10,000 clients
    "compression": "benchmarks.bench_compression",  # compressed reports: bytes, CPU, accuracy
    "fedbuff": "benchmarks.bench_fedbuff",  # async vs sync with 5 of 10 workers 5x slower
    "secagg": "benchmarks.bench_secagg",  # secure aggregation's CPU, worker and node, vs n, k
    "secagg-masks": "benchmarks.bench_secagg_masks",  # a worker's 1 + k masks, in place vs not
    "flower": "benchmarks.bench_flower",  # simulation and SecAgg+ next to Flower 1.42's
}


def _default() -> list[str]:
    """Every benchmark, less Flower's unless its own venv exists (CI never installs
    Flower; ``benchmarks/flower/ensure-env`` makes it)."""
    from benchmarks.bench_flower import flower_python

    return [n for n in BENCHMARKS if n != "flower" or flower_python() is not None]


def main(argv: list[str]) -> int:
    names = argv or _default()
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        return 2
    for name in names:
        print(f"\n=== {name} ({BENCHMARKS[name]}) ===", flush=True)
        started = time.perf_counter()
        importlib.import_module(BENCHMARKS[name]).main([])  # each with its defaults
        print(f"--- {name} took {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
