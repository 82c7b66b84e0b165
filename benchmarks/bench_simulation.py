"""Simulation memory does not grow with the number of virtual clients.

MNIST (60k examples) split by Dirichlet(0.5) (Hsu et al.) over N = 100 and N = 10,000
clients, the McMahan 2NN, 10 clients per round, 2 worker processes, in one run. Printed
per N: the peak physical memory of the simulation (the sum of PSS of this process and
its pool workers, sampled every 50 ms while it runs), the peak RSS of this process,
seconds per round and start-up; then the ratio N = 10,000 / N = 100. Clients hold the
same data either way (the shards are memory-mapped and read by index), so the ratio
should be close to 1.

    python -m benchmarks.bench_simulation [--rounds 3] [--clients 100 10000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from gridfl import state
from gridfl.datasets import load_mnist
from gridfl.demo.run import DemoOptions, _compile_evaluation, _compile_training, _memory_kb
from gridfl.simulation import SimulationOptions, simulate


class _Sampler(threading.Thread):
    """Peak sum of PSS of this process and its children, every ``every`` seconds."""

    def __init__(self, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.every, self.peak_kb, self._done = every, 0, threading.Event()

    def _pids(self) -> list[int]:
        pids = [os.getpid()]
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return pids

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.peak_kb = max(self.peak_kb, sum(_memory_kb(p)[1] for p in self._pids()))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak_kb / 1024


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench_simulation")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 10_000])
    args = ap.parse_args(argv)

    mnist = load_mnist()
    demo = DemoOptions(model="2nn", batch_size=5, lr=0.1)
    x, y = mnist.x_train[:5], mnist.y_train[:5]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        model, training = pool.submit(_compile_training, demo, x, y).result()
        evaluation = pool.submit(_compile_evaluation, demo, x, y).result()
    process = {
        "model": state.loads(model),
        "plans": {"training_plan": training, "evaluation_plan": evaluation},
        # 10,000 Dirichlet clients hold 6 examples each: B = 5, one epoch
        "client_config": {"name": "mnist-2nn", "version": "1", "batch_size": 5, "lr": 0.1,
                          "max_epochs": 1, "max_updates": 20},
        "server_config": {"max_diffs": 10},
    }
    rows = []
    for n in args.clients:
        sampler = _Sampler()
        sampler.start()
        result = simulate(**process, data=(mnist.x_train, mnist.y_train), options=SimulationOptions(
            num_clients=n, partitioner="dirichlet", partition_options={"alpha": 0.5},
            rounds=args.rounds, seed=0, workers=2))
        peak = sampler.stop()
        per_round = statistics.median(r.seconds for r in result.rounds)
        rows.append((n, peak, per_round, result.startup_seconds))
        print(f"N={n:>6}: peak PSS (main + 2 workers) {peak:7.1f} MB; "
              f"{per_round:.2f} s/round; start-up {result.startup_seconds:.2f} s", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process over both runs: {rss:.1f} MB")
    if len(rows) >= 2:
        (n0, m0, *_), (n1, m1, *_) = rows[0], rows[-1]
        print(f"memory ratio N={n1} / N={n0}: {m1 / m0:.3f} ({n1 // n0}x the clients)")


if __name__ == "__main__":
    import sys

    started = time.perf_counter()
    main(sys.argv[1:])
    print(f"took {time.perf_counter() - started:.1f} s")
