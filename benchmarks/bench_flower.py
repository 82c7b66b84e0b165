"""gridfl's simulation next to Flower 1.42's (on Ray), on the same workloads, in one run.

Flower runs in its own venv (``benchmarks/flower/ensure-env`` makes ``.venv-flower``:
``flwr[simulation]==1.42.0``, torch 2.13 CPU); it is never one of gridfl's dependencies,
and this benchmark is opt-in in ``make bench`` (it runs there only once that venv exists).

Each side is a child process started by this one, so both are measured the same way:

* start-up: from the child's launch to its first aggregated model (imports, data
  loading, worker pool or Ray, first round); gridfl's ONNX plans are compiled before,
  as a host compiles them once before hosting (the compile time is printed apart); and
  the part of it before the first round's clients are sent their task (gridfl: handed
  to the pool; Flower: its strategy's ``configure_fit`` for round 1), so the rest is the
  first round itself (Flower starts its Ray actors lazily, within that round);
* seconds per round: the median interval between two rounds' ends over rounds 2..N, a
  round ending once its new model is evaluated on the 10k test set (when on);
* peak memory: the largest sum of PSS (and of RSS) over the child and all its
  descendants (Ray's GCS, raylet, dashboard and actors; gridfl's pool), every 200 ms;
* CPU seconds of the whole run (user + system of the child and its descendants, read
  with the memory), which a busy shared machine changes less than wall-clock seconds;
* accuracy on the 10k test set after the last round.

Both sides start from the same initial weights and the same partition (made here with
gridfl's partitioners and handed to Flower as ``.npy`` files), use 2 workers (gridfl's
pool; Flower's Ray with ``num_cpus=1`` per client, torch on one thread) and SGD, lr 0.1.

Parts (``--part``):

* ``speed``: McMahan et al.'s workloads, K = 100 IID shards of 600, C = 0.1, B = 10,
  E = 1, 2NN and CNN, central evaluation every round;
* ``scale``: 10,000 clients, Dirichlet(0.5) over MNIST, 100 per round, 2NN, B = 5
  (a client holds 6 examples on average), central evaluation every round;
* ``secagg``: the cost of secure aggregation at n clients per round (2NN, K = 100 IID,
  no evaluation). Flower: the same rounds with and without SecAgg+
  (``SecAggPlusWorkflow`` + ``secaggplus_mod``, ``num_shares`` = k + 1,
  ``reconstruction_threshold`` = t). gridfl: the same rounds of ``gridfl.simulation``
  with and without ``secure_aggregation`` (k neighbours, threshold t, the protocol's four
  stages for every client run by the worker's and the node's own code in the driving
  process, one core), both measured.

    benchmarks/flower/ensure-env    # once: Flower's own venv, .venv-flower
    python -m benchmarks.bench_flower [--part speed scale secagg] [--rounds 6] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FLOWER_DIR = ROOT / "benchmarks" / "flower"
GOALS = {"2nn": 0.4, "cnn": 0.8}  # gridfl s/round at most this times Flower's
WORKERS = 2


def flower_python() -> Path | None:
    """The Flower venv's python, when benchmarks/flower/ensure-env has made it."""
    python = Path(os.environ.get("FLOWER_VENV", ROOT / ".venv-flower")) / "bin" / "python"
    return python if python.exists() else None


# ---------------------------------------------------------------- measuring a child


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def _cpu_ticks(pid: int) -> tuple[tuple[int, int], int] | None:
    """((pid, start time), user + system clock ticks) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (pid, int(fields[19])), int(fields[11]) + int(fields[12])


class TreeSampler(threading.Thread):
    """Peak sums of PSS and of RSS over a process and all its descendants, and the CPU
    time they used (each process's last reading: a process that lives less than one
    sampling interval is missed, on both sides alike)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_pss_kb = self.peak_rss_kb = 0
        self.ticks: dict[tuple[int, int], int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        from gridfl._resources import memory_kb

        while not self._done.wait(self.every):
            pids = _descendants(self.pid)
            sizes = [memory_kb(p) for p in pids]
            self.peak_rss_kb = max(self.peak_rss_kb, sum(s[0] for s in sizes))
            self.peak_pss_kb = max(self.peak_pss_kb, sum(s[1] for s in sizes))
            for reading in filter(None, map(_cpu_ticks, pids)):
                self.ticks[reading[0]] = reading[1]

    def stop(self) -> tuple[float, float, float]:
        """(peak PSS MB, peak RSS MB, CPU seconds)."""
        self._done.set()
        self.join()
        cpu = sum(self.ticks.values()) / os.sysconf("SC_CLK_TCK")
        return self.peak_pss_kb / 1024, self.peak_rss_kb / 1024, cpu


def run_child(command: list[str], timeout: float) -> dict[str, Any]:
    """Launch a side, sample its tree's memory, return its JSON line plus the figures."""
    launched = time.time()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, start_new_session=True)
    sampler = TreeSampler(child.pid)
    sampler.start()
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{command[:3]} took more than {timeout:.0f} s") from None
    finally:
        pss, rss, cpu = sampler.stop()
        # its own session: whatever it left running (Ray's daemons) goes with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command[:3])} failed ({child.returncode}):\n{err[-3000:]}")
    got = json.loads(lines[-1])
    ends = got["marks"]["evaluated"] or got["marks"]["aggregated"]
    intervals = np.diff([launched, *ends]).tolist()
    return {
        "startup": got["marks"]["aggregated"][0] - launched,
        "before_first_round": (got["marks"]["dispatched"][0] - launched
                               if got["marks"].get("dispatched") else None),
        "per_round": statistics.median(intervals[1:] or intervals),
        "pss_mb": pss, "rss_mb": rss,
        "accuracy": got["accuracy"][-1] if got["accuracy"] else None,
        "rounds": len(ends),
        "cpu_s": cpu,
        "first_round": got.get("first_round"),
    }


# ---------------------------------------------------------------- the shared inputs


def write_inputs(directory: Path, mnist, parts: list[np.ndarray], params: list[np.ndarray],
                 plans: dict[str, bytes]) -> None:
    """Data, partition and initial weights as .npy (both sides), plans as files (gridfl)."""
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.save(directory / f"{name}.npy", getattr(mnist, name))
    np.savez(directory / "train.npz", x=mnist.x_train, y=mnist.y_train)
    np.save(directory / "indices.npy", np.concatenate(parts).astype(np.int64))
    np.save(directory / "offsets.npy", np.cumsum([0, *map(len, parts)]).astype(np.int64))
    np.save(directory / "params_count.npy", np.array(len(params)))
    for i, p in enumerate(params):
        np.save(directory / f"param_{i}.npy", p)
    for name, blob in plans.items():
        (directory / f"{name}.onnx").write_bytes(blob)


def compile_process(model: str, mnist, batch_size: int) -> tuple[list[np.ndarray], dict, float]:
    """The McMahan model's initial weights and plans, compiled in a child (torch)."""
    from gridfl import state
    from gridfl.demo.options import DemoOptions
    from gridfl.demo.plans import compile_evaluation, compile_training

    demo = DemoOptions(model=model, batch_size=batch_size, lr=0.1)
    x, y = mnist.x_train[:batch_size], mnist.y_train[:batch_size]
    started = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        params, training = pool.submit(compile_training, demo, x, y).result()
        evaluation = pool.submit(compile_evaluation, demo, x, y).result()
    plans = {"training_plan": training, "evaluation_plan": evaluation}
    return state.loads(params), plans, time.perf_counter() - started


# ---------------------------------------------------------------- gridfl's child


def gridfl_child(run_file: Path) -> None:
    """Run gridfl.simulation on the inputs of ``run_file``; print one JSON line."""
    run = json.loads(run_file.read_text())
    from gridfl.simulation import SimulationOptions, simulate

    data = Path(run["data_dir"])
    params = [np.load(data / f"param_{i}.npy")
              for i in range(int(np.load(data / "params_count.npy")))]
    plans = {name: (data / f"{name}.onnx").read_bytes()
             for name in ("training_plan", "evaluation_plan")}
    offsets = np.load(data / "offsets.npy")
    indices = np.load(data / "indices.npy")
    parts = [indices[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]

    def given(labels, num_clients, rng):  # the partition the parent made, for both sides
        return parts

    test = (np.load(data / "x_test.npy"), np.load(data / "y_test.npy"))
    marks: dict[str, list[float]] = {"aggregated": [], "evaluated": []}
    called = time.time()
    result = simulate(
        model=params, plans=plans,
        client_config={"name": f"mnist-{run['model']}", "version": "1",
                       "batch_size": run["batch_size"], "lr": run["lr"], "max_epochs": 1},
        server_config={"max_diffs": run["per_round"], **run.get("server_config", {})},
        # a path, as `gridfl simulate --data` takes it: simulate frees the arrays once it
        # has written the clients' memory-mapped shards (Flower's driver holds none either)
        data=data / "train.npz",
        test_data=test if run["evaluate"] else None,
        options=SimulationOptions(num_clients=run["num_clients"], partitioner=given,
                                  rounds=run["rounds"], seed=0, workers=run["cpus"]),
        on_round=lambda entry: marks["evaluated"].append(time.time()),  # a round's end
    )
    assert result.startup_seconds is not None
    marks["aggregated"] = [called + result.startup_seconds]
    # the first round's tasks were handed to the pool its own seconds before its model
    marks["dispatched"] = [called + result.startup_seconds - result.rounds[0].seconds]
    accuracy = [r.central["accuracy"] for r in result.rounds if "accuracy" in r.central]
    print(json.dumps({"marks": marks, "accuracy": accuracy,
                      "first_round": result.rounds[0].seconds}), flush=True)


# ---------------------------------------------------------------- one workload, both sides


def both_sides(directory: Path, run: dict[str, Any], flower: Path, timeout: float,
               tag: str) -> tuple[dict, dict]:
    """The same run file for both children; returns (gridfl, flower) figures."""
    run_file = directory / f"{tag}.json"
    run_file.write_text(json.dumps({**run, "data_dir": str(directory), "cpus": WORKERS}))
    gridfl = run_child([sys.executable, "-m", "benchmarks.bench_flower", "--child",
                        str(run_file)], timeout)
    flwr = run_child([str(flower), str(FLOWER_DIR / "flower_side.py"), str(run_file)],
                     timeout)
    return gridfl, flwr


def _row(label: str, g: float | None, f: float | None, unit: str, goal: str = "") -> str:
    if g is None or f is None:
        return f"  {label:<28} {'-':>10} {'-':>10}"
    ratio = f"x{g / f:.2f}" if f else "-"
    digits = 0 if unit == "MB" else 2
    return f"  {label:<28} {g:>10.{digits}f} {f:>10.{digits}f} {ratio:>13}  {goal}"


def print_table(title: str, g: dict, f: dict, goals: dict[str, float]) -> None:
    print(f"{title}\n  {'':<28} {'gridfl':>10} {'Flower':>10} {'gridfl/Flower':>13}")

    def goal(key: str) -> str:
        if key not in goals:
            return ""
        ok = g[key] <= goals[key] * f[key]
        return f"goal <= x{goals[key]:.2f}: {'met' if ok else 'MISSED'}"
    print(_row("s/round (median, r 2..N)", g["per_round"], f["per_round"], "s",
               goal("per_round")))
    print(_row("start-up to 1st aggregate, s", g["startup"], f["startup"], "s", goal("startup")))
    print(_row("peak memory, sum PSS, MB", g["pss_mb"], f["pss_mb"], "MB", goal("pss_mb")))
    print(_row("peak memory, sum RSS, MB", g["rss_mb"], f["rss_mb"], "MB"))
    print(_row("CPU s, whole run (tree)", g["cpu_s"], f["cpu_s"], "s"))
    if g["accuracy"] is not None:
        print(_row(f"test accuracy after {g['rounds']} rounds", 100 * g["accuracy"],
                   100 * f["accuracy"], "%"))
    print(_row("  of which before round 1, s", g["before_first_round"],
               f["before_first_round"], "s"))
    print(flush=True)


# ---------------------------------------------------------------- the parts


def speed(directory: Path, mnist, rounds: int, flower: Path, models: list[str]) -> None:
    from gridfl.simulation import partition

    parts = partition(mnist.y_train, 100, "iid", seed=0)
    for model in models:
        params, plans, compiled = compile_process(model, mnist, 10)
        write_inputs(directory, mnist, parts, params, plans)
        run = {"model": model, "num_clients": 100, "per_round": 10, "fraction": 0.1,
               "batch_size": 10, "lr": 0.1, "rounds": rounds, "evaluate": True}
        g, f = both_sides(directory, run, flower, 900, f"speed-{model}")
        print_table(f"{model.upper()} E=1, K=100 IID, C=0.1, B=10, {rounds} rounds "
                    f"(gridfl plans compiled once before: {compiled:.1f} s)", g, f,
                    {"per_round": GOALS[model], "startup": 0.2, "pss_mb": 0.5})


def scale(directory: Path, mnist, rounds: int, flower: Path) -> None:
    from gridfl.simulation import partition

    parts = partition(mnist.y_train, 10_000, "dirichlet", seed=0, alpha=0.5)
    params, plans, _ = compile_process("2nn", mnist, 5)
    write_inputs(directory, mnist, parts, params, plans)
    run = {"model": "2nn", "num_clients": 10_000, "per_round": 100, "fraction": 0.01,
           "batch_size": 5, "lr": 0.1, "rounds": rounds, "evaluate": True}
    g, f = both_sides(directory, run, flower, 1200, "scale")
    print_table(f"scale: 10,000 clients Dirichlet(0.5), 100 per round, 2NN, B=5, "
                f"{rounds} rounds", g, f, {})
    print(f"  gridfl peak memory {g['pss_mb']:.0f} MB (sum PSS): goal under 2048 MB: "
          f"{'met' if g['pss_mb'] < 2048 else 'MISSED'}\n", flush=True)


def secagg(directory: Path, mnist, rounds: int, flower: Path, sizes: list[int]) -> None:
    from gridfl.simulation import partition

    parts = partition(mnist.y_train, 100, "iid", seed=0)
    params, plans, _ = compile_process("2nn", mnist, 10)
    write_inputs(directory, mnist, parts, params, plans)
    print("secure aggregation, 2NN, K=100 IID, B=10, n clients per round, no evaluation\n"
          f"  {'n':>4} {'k':>3} {'t':>3} | {'Flower s/round':>14} {'+SecAgg+':>9} "
          f"{'overhead':>8} | {'gridfl s/round':>14} {'+SecAgg+':>9} {'overhead':>8}")
    for n in sizes:
        k = 2 * math.ceil(math.log2(n) / 2)  # even, ~log2 n (bench_secagg's choice)
        t = (k + 1) // 2 + 1
        run = {"model": "2nn", "num_clients": 100, "per_round": n, "fraction": n / 100,
               "batch_size": 10, "lr": 0.1, "rounds": rounds, "evaluate": False}
        g, f = both_sides(directory, run, flower, 900, f"plain-{n}")
        run_file = directory / f"secagg-{n}.json"
        secure = {"max_workers": n, "secure_aggregation": {
            "threshold": t, "neighbours": k, "clipping_range": 1.0, "field_bits": 40,
            "max_num_samples": 1024}}
        run_file.write_text(json.dumps({**run, "data_dir": str(directory), "cpus": WORKERS,
                                        "secagg": {"num_shares": k + 1, "threshold": t},
                                        "server_config": secure}))
        fs = run_child([str(flower), str(FLOWER_DIR / "flower_side.py"), str(run_file)], 900)
        gs = run_child([sys.executable, "-m", "benchmarks.bench_flower", "--child",
                        str(run_file)], 900)
        print(f"  {n:>4} {k:>3} {t:>3} | {f['per_round']:>14.2f} {fs['per_round']:>9.2f} "
              f"{'x%.2f' % (fs['per_round'] / f['per_round']):>8} | {g['per_round']:>14.2f} "
              f"{gs['per_round']:>9.2f} {'x%.2f' % (gs['per_round'] / g['per_round']):>8}",
              flush=True)
    print("  k: neighbours (Flower num_shares = k + 1, counting the client itself); t: shares"
          "\n  to reconstruct. Both sides' rounds are simulated; gridfl runs the protocol's"
          "\n  stages for every client in its driving process.\n")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench_flower", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", nargs="+", choices=("speed", "scale", "secagg"),
                    default=["speed", "scale", "secagg"])
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run (default 6)")
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50, 100],
                    help="clients per round for the secagg part (default 10 50 100)")
    ap.add_argument("--model", nargs="+", choices=("2nn", "cnn"), default=["2nn", "cnn"],
                    help="the speed part's models (default both)")
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds, the 2NN only, secagg at n = 10 (a few minutes)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        gridfl_child(args.child)
        return
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (s/round is the median over rounds 2..N)")
    if any(n < 3 or n > 100 for n in args.n):
        ap.error("--n takes clients per round between 3 and 100 (K = 100 clients)")
    flower = flower_python()
    if flower is None:
        print("Flower's venv is missing: run benchmarks/flower/ensure-env first "
              "(it installs flwr[simulation]==1.42.0 and torch CPU into .venv-flower)")
        raise SystemExit(1)
    from gridfl.datasets import load_mnist

    rounds = 3 if args.quick else args.rounds
    models = ["2nn"] if args.quick else args.model
    sizes = [10] if args.quick else args.n
    mnist = load_mnist()
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        for part in args.part:
            started = time.perf_counter()
            if part == "speed":
                speed(Path(tmp), mnist, rounds, flower, models)
            elif part == "scale":
                scale(Path(tmp), mnist, rounds, flower)
            else:
                secagg(Path(tmp), mnist, rounds, flower, sizes)
            print(f"  ({part}: {time.perf_counter() - started:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
