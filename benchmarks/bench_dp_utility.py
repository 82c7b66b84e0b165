"""Differential privacy's utility curve on MNIST (DP-FedAvg, McMahan et al. 2018).

K = 1,000 IID clients of 60 examples each, 100 per cycle (q = 0.1), the McMahan 2NN and
CNN, client SGD with B = 10, E = 1, lr 0.2 (``--lr``), FedAvg at server lr 1 over the fixed
denominator m = 100, a fixed clip norm C, for z in {0 (clip only), 0.5, 1.0}; the RDP
accountant at delta = 1e-5. It prints test accuracy per cycle and ε, the ε at which each
run first passes 90%, writes every run's results.json under ``--out`` and the plot
(accuracy against cycles and against ε) to ``--plot``.

The noise is the simulation's, seeded from the run seed (docs/simulation.md); the privacy
figures are the node's accountant's for the same configuration.

    python -m benchmarks.bench_dp_utility [--models 2nn cnn] [--cycles 60] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_simulation import _process
from gridfl.datasets import load_mnist
from gridfl.simulation import SimulationOptions, simulate

K, PER_CYCLE, EXAMPLES, DELTA = 1000, 100, 60, 1e-5
NOISE = (0.0, 0.5, 1.0)


def run(model: str, z: float, clip: float, lr: float, cycles: int, mnist, x, y,
        out: Path, test_examples: int | None = None) -> dict:
    process = _process(model, mnist, 10)
    process["client_config"]["lr"] = lr
    process["server_config"] = {
        "max_workers": PER_CYCLE, "max_diffs": PER_CYCLE, "num_cycles": cycles,
        "differential_privacy": {"mode": "central", "noise_multiplier": z, "clip_norm": clip,
                                 "delta": DELTA, "population_size": K},
    }
    started = time.perf_counter()
    # the first test_examples of the test set: the CNN's 10k-example evaluation every
    # cycle is a large share of its run on two cores
    test = (mnist.x_test[:test_examples], mnist.y_test[:test_examples])
    result = simulate(**process, data=(x, y), test_data=test,
                      options=SimulationOptions(num_clients=K, seed=0, workers=2,
                                                out_dir=out / f"{model}-z{z:g}"),
                      on_round=lambda r: print(
                          f"    {model} z={z:g} cycle {r.round}: accuracy "
                          f"{r.central.get('accuracy', math.nan):.4f} epsilon "
                          f"{(r.privacy or {}).get('epsilon')}", flush=True))
    acc = [r.central.get("accuracy", math.nan) for r in result.rounds]
    eps = [math.inf if r.privacy is None or r.privacy["epsilon"] is None
           else r.privacy["epsilon"] for r in result.rounds]
    first = next((i for i, a in enumerate(acc) if a >= 0.9), None)
    print(f"  {model.upper()} z={z:g} C={clip:g} lr={lr:g}: accuracy after {len(acc)} cycles "
          f"{100 * acc[-1]:.2f}% (best {100 * max(acc):.2f}%), epsilon {eps[-1]:.3g}; 90% "
          + ("not reached" if first is None else
             f"first at cycle {first + 1}, epsilon {eps[first]:.3g}")
          + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"model": model, "z": z, "clip": clip, "lr": lr, "accuracy": acc, "epsilon": eps,
            "first_90": None if first is None else first + 1}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model in zip(axes, models, strict=True):
        for r in (r for r in runs if r["model"] == model):
            label = "z = 0 (clip only)" if r["z"] == 0 else f"z = {r['z']:g}"
            cycles = np.arange(1, len(r["accuracy"]) + 1)
            color = f"C{sorted(NOISE).index(r['z'])}" if r["z"] in NOISE else None
            row[0].plot(cycles, r["accuracy"], label=label, color=color)
            if r["z"] > 0:
                row[1].plot(r["epsilon"], r["accuracy"], label=label, color=color)
        row[0].set(xlabel="cycle", ylabel="test accuracy",
                   title=f"{model.upper()}: accuracy against cycles")
        row[1].set(xlabel="epsilon (delta = 1e-5, RDP)", ylabel="test accuracy",
                   title=f"{model.upper()}: accuracy against epsilon", xscale="log")
        for ax in row:
            ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"DP-FedAvg on MNIST: K = {K} clients of {EXAMPLES} examples, "
                 f"{PER_CYCLE} per cycle")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench_dp_utility")
    ap.add_argument("--models", nargs="+", choices=("2nn", "cnn"), default=["2nn", "cnn"])
    ap.add_argument("--noise", nargs="+", type=float, default=list(NOISE))
    ap.add_argument("--cycles", type=int, default=60)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.2, help="the clients' SGD learning rate")
    ap.add_argument("--quick", action="store_true", help="3 cycles of each: a smoke run")
    ap.add_argument("--test-examples", type=int, default=None,
                    help="evaluate on the first N test examples only (default: all 10,000)")
    ap.add_argument("--out", type=Path, default=Path("build/bench_dp_utility"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--replot", type=Path, nargs="+", default=None,
                    help="draw --plot from earlier runs' curves.json, run nothing")
    args = ap.parse_args(argv)
    if args.test_examples is not None and not 1 <= args.test_examples <= 10_000:
        ap.error("--test-examples must be in [1, 10000]")
    if args.replot:
        plot([r for f in args.replot for r in json.loads(f.read_text())],
             args.plot or args.out / "dp_utility.png")
        return
    cycles = 3 if args.quick else args.cycles
    mnist = load_mnist()
    # K clients of 60 examples: the first 60,000 training examples (IID split)
    x, y = mnist.x_train[: K * EXAMPLES], mnist.y_train[: K * EXAMPLES]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for model in args.models:
        for z in args.noise:
            runs.append(run(model, z, args.clip, args.lr, cycles, mnist, x, y, args.out,
                            args.test_examples))
            (args.out / "curves.json").write_text(json.dumps(runs, default=str))
    plot(runs, args.plot or args.out / "dp_utility.png")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
