"""Simulation: memory against the number of clients, speed and scale on MNIST.

Three parts, in one run (``--part`` to pick):

* ``memory``: MNIST split by Dirichlet(0.5) (Hsu et al.) over N = 100 and N = 10,000
  clients, the McMahan 2NN, 10 clients per round, B = 5: the peak physical memory of the
  simulation (sum of PSS of this process and its pool workers, sampled every 50 ms) for
  each N, and their ratio. The shards are memory-mapped and read by index, so the ratio
  should be close to 1.
* ``speed``: Flower 1.42's baseline workloads (docs/performance.md; K = 100 IID
  shards, C = 0.1, B = 10, E = 1, lr 0.1, central evaluation on the 10k test set every
  round), 2NN and CNN: median seconds per round over rounds 2..N, start-up (call ->
  first aggregated model) and peak memory. Flower 1.42's figures are the reference
  file's, measured on a machine of the same kind, not in this run: the ratios printed
  against them are indicative only.
* ``scale``: 10,000 Dirichlet(0.5) clients, 100 per round, 2NN, B = 5 (a client holds
  6 examples): seconds per round and peak memory.

    python -m benchmarks.bench_simulation [--part memory speed scale] [--rounds 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.bench_fl import FLOWER
from gridfl import state
from gridfl._resources import memory_kb
from gridfl.datasets import Mnist, load_mnist
from gridfl.demo.options import DemoOptions
from gridfl.demo.plans import compile_evaluation, compile_training
from gridfl.simulation import SimulationOptions, simulate

#: Flower 1.42 measured on this machine: start-up and memory of Flower's simulation
FLOWER_STARTUP = (10.0, 17.0)
FLOWER_MEMORY_MB = (1400.0, 2000.0)


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
            self.peak_kb = max(self.peak_kb, sum(memory_kb(p)[1] for p in self._pids()))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak_kb / 1024


def _process(model: str, mnist: Mnist, batch_size: int) -> dict:
    """The McMahan model's initial params and plans (compiled in a child: torch)."""
    demo = DemoOptions(model=model, batch_size=batch_size, lr=0.1)
    x, y = mnist.x_train[:batch_size], mnist.y_train[:batch_size]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        params, training = pool.submit(compile_training, demo, x, y).result()
        evaluation = pool.submit(compile_evaluation, demo, x, y).result()
    return {
        "model": state.loads(params),
        "plans": {"training_plan": training, "evaluation_plan": evaluation},
        "client_config": {"name": f"mnist-{model}", "version": "1",
                          "batch_size": batch_size, "lr": 0.1, "max_epochs": 1},
        "server_config": {"max_diffs": 10},
    }


def _measured(process: dict, mnist: Mnist, options: SimulationOptions, test: bool):
    sampler = _Sampler()
    sampler.start()
    result = simulate(**process, data=(mnist.x_train, mnist.y_train),
                      test_data=(mnist.x_test, mnist.y_test) if test else None,
                      options=options)
    peak = sampler.stop()
    later = [r.seconds for r in result.rounds[1:]] or [result.rounds[0].seconds]
    return result, peak, statistics.median(later)


def memory(mnist: Mnist, rounds: int) -> None:
    process = _process("2nn", mnist, 5)
    process["client_config"]["max_updates"] = 20
    peaks = {}
    for n in (100, 10_000):
        _, peak, per_round = _measured(process, mnist, SimulationOptions(
            num_clients=n, partitioner="dirichlet", partition_options={"alpha": 0.5},
            rounds=rounds, seed=0, workers=2), test=False)
        peaks[n] = peak
        print(f"  N={n:>6}: peak memory (PSS, this process + 2 workers) {peak:7.1f} MB; "
              f"{per_round:.2f} s/round", flush=True)
    print(f"  memory ratio N=10000 / N=100: {peaks[10_000] / peaks[100]:.3f} "
          "(100x the clients)")


def speed(mnist: Mnist, rounds: int) -> None:
    for model in ("2nn", "cnn"):
        process = _process(model, mnist, 10)
        result, peak, per_round = _measured(process, mnist, SimulationOptions(
            num_clients=100, rounds=rounds, seed=0, workers=2), test=True)
        flower = FLOWER[model]["simulation"]
        acc = result.rounds[-1].central.get("accuracy", 0.0)
        print(
            f"  {model.upper()} E=1: {per_round:.2f} s/round (x{per_round / flower:.2f} of "
            f"Flower's {flower} s, reference); start-up {result.startup_seconds:.2f} s "
            f"(Flower {FLOWER_STARTUP[0]:.0f}-{FLOWER_STARTUP[1]:.0f} s); peak memory "
            f"{peak:.0f} MB (Flower {FLOWER_MEMORY_MB[0]:.0f}-{FLOWER_MEMORY_MB[1]:.0f} MB); "
            f"test accuracy after {rounds} rounds {100 * acc:.1f}%", flush=True)


def scale(mnist: Mnist, rounds: int) -> None:
    process = _process("2nn", mnist, 5)
    process["server_config"]["max_diffs"] = 100
    _, peak, per_round = _measured(process, mnist, SimulationOptions(
        num_clients=10_000, partitioner="dirichlet", partition_options={"alpha": 0.5},
        rounds=rounds, seed=0, workers=2), test=True)
    print(f"  10,000 clients, 100 per round: {per_round:.2f} s/round, peak memory "
          f"{peak:.0f} MB (goal: under 2048 MB)", flush=True)


PARTS = {"memory": memory, "speed": speed, "scale": scale}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench_simulation")
    ap.add_argument("--part", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    mnist = load_mnist()
    for part in args.part:
        print(f"{part}:", flush=True)
        started = time.perf_counter()
        PARTS[part](mnist, args.rounds)
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
