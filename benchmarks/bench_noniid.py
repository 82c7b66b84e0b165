"""Rounds to 97% test accuracy for the 2NN (or the CNN, ``--model cnn``) on McMahan's
pathological non-IID MNIST split (K = 100 clients of 2 label-sorted shards each, C = 0.1,
E = 1, B = 10), for FedAvg, FedAvgM, FedAdam, FedYogi and FedProx, each over a small grid
of its learning rate (the client's for FedAvg, the server's for the optimizers, mu for
FedProx), with the simulation engine. All strategies run in one process on the same
split, seeds and clients per round.

    python -m benchmarks.bench_noniid [--rounds 1000] [--target 0.97] [--plot out.png]
    python -m benchmarks.bench_noniid --quick      # one grid point each, 10 rounds
    python -m benchmarks.bench_noniid --strategies fedavg fedadam fedyogi \
        --etas 0.03 0.1 0.3 --client-lrs 0.1 0.2 --fedavg-lrs 0.2   # a wider, joint grid

``--etas`` and ``--client-lrs`` replace the adaptive optimizers' grid by every pair of a
server rate and a client rate (Reddi et al. tune the two jointly, eta over 1e-3..1);
``--fedavg-lrs`` replaces FedAvg's client-rate grid. ``--point`` (repeated) replaces the
whole grid by the settings it names: a strategy, its hyperparameters, and the client rate
``lr`` (docs/performance.md gives the commands behind its tables):

    python -m benchmarks.bench_noniid --model cnn --rounds 100 \
        --point fedavg lr=0.1 --point fedyogi eta=0.01 lr=0.1
    python -m benchmarks.bench_noniid --rounds 114 \
        --point fedavgm server_learning_rate=1 server_momentum=0.6 lr=0.15

Prints, per strategy and grid point, the first round whose model reaches the target on
the 10k test set ("> N" when it did not within ``--rounds``; a run stops at its target,
evaluating every ``--evaluate-every`` rounds until within 1 point of it, then every round,
so the lower milestones are multiples of that) and the best accuracy seen;
then the best of each strategy and its ratio to FedAvg's rounds. FedAvg needed 793 rounds
in ``gridfl demo`` (docs/performance.md) and 664 in McMahan et al.: a full run is hours
on two cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from gridfl import state
from gridfl.datasets import Mnist, load_mnist
from gridfl.demo.options import DemoOptions
from gridfl.demo.plans import compile_evaluation, compile_training
from gridfl.simulation import SimulationOptions, simulate

CLIENT_LR = 0.1  # McMahan et al.'s 2NN rate; the others tune the server's rate (or mu)
#: strategy -> grid of (label, server_config.strategy or None, client lr or None)
GRID: dict[str, list[tuple[str, dict | None, float | None]]] = {
    "fedavg": [(f"lr {lr}", None, lr) for lr in (0.05, 0.1, 0.2)],
    "fedavgm": [(f"momentum {m}", {"name": "fedavgm", "server_learning_rate": 1.0,
                                    "server_momentum": m}, None) for m in (0.7, 0.9)],
    "fedadam": [(f"eta {e}", {"name": "fedadam", "eta": e}, None) for e in (0.001, 0.003, 0.01)],
    "fedyogi": [(f"eta {e}", {"name": "fedyogi", "eta": e}, None) for e in (0.001, 0.003, 0.01)],
    "fedprox": [(f"mu {m}", {"name": "fedprox", "proximal_mu": m}, None) for m in (0.001, 0.01)],
}
ADAPTIVE = ("fedadam", "fedyogi")


def joint_grid(name: str, etas: list[float], client_lrs: list[float]) -> list:
    """An adaptive optimizer's grid over every (server eta, client lr) pair."""
    return [(f"eta {e}, lr {lr}", {"name": name, "eta": e}, lr)
            for lr in client_lrs for e in etas]


QUICK = {"fedavg": 1, "fedavgm": 1, "fedadam": 1, "fedyogi": 1, "fedprox": 1}


def parse_point(words: list[str]) -> tuple[str, str, dict | None, float | None]:
    """``["fedadam", "eta=0.01", "lr=0.2"]`` -> ``(name, label, strategy, client lr)``:
    every ``key=value`` but ``lr`` is a hyperparameter of the strategy (a number).

    >>> parse_point(["fedadam", "eta=0.01", "lr=0.2"])
    ('fedadam', 'eta=0.01, lr=0.2', {'name': 'fedadam', 'eta': 0.01}, 0.2)
    """
    name, *pairs = words
    settings: dict[str, float] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        try:
            settings[key] = float(value)
        except ValueError:
            eq = ""
        if not eq or not key:
            raise ValueError(f"--point {name}: {pair!r} is not key=number")
    lr = settings.pop("lr", None)
    if lr is not None and lr <= 0:
        raise ValueError(f"--point {name}: lr must be > 0")
    strategy = None if name == "fedavg" and not settings else {"name": name, **settings}
    return name, ", ".join(pairs) or "defaults", strategy, lr


def _processes(mnist: Mnist, model: str = "2nn") -> dict[str, dict]:
    """The model's initial params and plans, plain and FedProx (compiled in a child: torch)."""
    x, y = mnist.x_train[:10], mnist.y_train[:10]
    ctx = multiprocessing.get_context("spawn")
    out = {}
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        for kind, mu in (("plain", None), ("fedprox", 0.01)):
            demo = DemoOptions(model=model, batch_size=10, lr=CLIENT_LR, proximal_mu=mu)
            params, training = pool.submit(compile_training, demo, x, y).result()
            evaluation = pool.submit(compile_evaluation, demo, x, y).result()
            out[kind] = {"model": state.loads(params),
                         "plans": {"training_plan": training, "evaluation_plan": evaluation}}
    return out


def _run(process: dict, strategy: dict | None, lr: float, mnist: Mnist, rounds: int,
         workers: int, target: float, every: int, model: str = "2nn"):
    """(best accuracy, accuracy per round, seconds) of one run."""
    result = simulate(
        **process,
        client_config={"name": f"noniid-{model}", "version": "1", "batch_size": 10,
                       "lr": lr, "max_epochs": 1},
        server_config={"max_diffs": 10, "strategy": strategy},
        data=(mnist.x_train, mnist.y_train), test_data=(mnist.x_test, mnist.y_test),
        options=SimulationOptions(num_clients=100, partitioner="shards", rounds=rounds,
                                  seed=0, workers=workers, target_accuracy=target,
                                  evaluate_every=every,
                                  # every round evaluated: each in full, for exact curves
                                  near_target=0.0 if every == 1 else 0.01),
    )
    # rounds not evaluated (far from the target) carry the last accuracy seen forward
    accs, last = [], 0.0
    for r in result.rounds:
        last = r.central.get("accuracy", last) if r.central else last
        accs.append(last)
    return max(accs), accs, result.total_seconds or 0.0


def rounds_to(accs: list[float], target: float) -> int | None:
    """The first round whose model reaches ``target`` (1-based), or None."""
    return next((i + 1 for i, a in enumerate(accs) if a >= target), None)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench_noniid")
    ap.add_argument("--rounds", type=int, default=None, help="per run (default 1000; quick 10)")
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--also", type=float, nargs="*", default=[0.90, 0.95],
                    help="lower targets whose rounds are printed too")
    ap.add_argument("--quick", action="store_true", help="one grid point per strategy")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--evaluate-every", type=int, default=5,
                    help="rounds between central evaluations until within 1 point of the "
                    "target (then every round; the run stops at the target); 1: every "
                    "round, each evaluation in full (exact curves)")
    ap.add_argument("--strategies", nargs="+", choices=list(GRID), default=list(GRID))
    ap.add_argument("--etas", type=float, nargs="+", default=None,
                    help="FedAdam/FedYogi server rates (replaces their grid)")
    ap.add_argument("--client-lrs", type=float, nargs="+", default=[CLIENT_LR],
                    help="client rates paired with each of --etas")
    ap.add_argument("--fedavg-lrs", type=float, nargs="+", default=None,
                    help="FedAvg client rates (replaces its grid)")
    ap.add_argument("--plot", type=Path, default=None, help="accuracy curves (PNG)")
    ap.add_argument("--model", choices=["2nn", "cnn"], default="2nn")
    ap.add_argument("--point", nargs="+", action="append", default=None,
                    metavar="STRATEGY [KEY=VALUE ...]",
                    help="one setting to run (repeat it): replaces the grid")
    args = ap.parse_args(argv)
    rounds = args.rounds or (10 if args.quick else 1000)
    grids = dict(GRID)
    if args.etas:
        if any(e <= 0 for e in args.etas) or any(lr <= 0 for lr in args.client_lrs):
            ap.error("--etas and --client-lrs must be > 0")
        grids.update({n: joint_grid(n, args.etas, args.client_lrs) for n in ADAPTIVE})
    if args.fedavg_lrs:
        if any(lr <= 0 for lr in args.fedavg_lrs):
            ap.error("--fedavg-lrs must be > 0")
        grids["fedavg"] = [(f"lr {lr}", None, lr) for lr in args.fedavg_lrs]
    order = args.strategies
    if args.point:
        try:
            points = [parse_point(words) for words in args.point]
        except ValueError as e:
            ap.error(str(e))
        order = list(dict.fromkeys(name for name, *_ in points))
        grids = {n: [(label, st, lr) for name, label, st, lr in points if name == n]
                 for n in order}
    mnist = load_mnist()
    processes = _processes(mnist, args.model)
    print(f"{args.model.upper()}, pathological non-IID (2 shards/client), K=100, C=0.1, "
          f"E=1, B=10, client lr {CLIENT_LR} unless set; target {100 * args.target:.0f}%, "
          f"at most {rounds} rounds", flush=True)
    best: dict[str, tuple[int | None, float, str, list[float]]] = {}
    for name in order:
        grid = [grids[name][min(QUICK.get(name, 0), len(grids[name]) - 1)]] if args.quick \
            else grids[name]
        process = processes["fedprox" if name == "fedprox" else "plain"]
        for label, strategy, lr in grid:
            top, accs, seconds = _run(process, strategy, lr or CLIENT_LR, mnist, rounds,
                                      args.workers, args.target, args.evaluate_every,
                                      args.model)
            reached = rounds_to(accs, args.target)
            shown = "; ".join(
                f"{100 * t:.0f}%: {rounds_to(accs, t) or f'> {rounds}'}"
                for t in (*args.also, args.target))
            print(f"  {name:8} {label:18} rounds to {shown}; best accuracy "
                  f"{100 * top:.2f}% ({seconds:.0f} s)", flush=True)
            key = (reached or rounds + 1, -top)
            old = best.get(name)
            if old is None or key < (old[0] or rounds + 1, -old[1]):
                best[name] = (reached, top, label, accs)
    base = best.get("fedavg", (None,))[0]
    print("best per strategy:")
    for name, (reached, top, label, _) in best.items():
        ratio = f"; x{reached / base:.2f} of FedAvg's rounds" if reached and base else ""
        print(f"  {name:8} {label:14} {reached or f'> {rounds}'} rounds, best "
              f"{100 * top:.2f}%{ratio}")
    if args.plot:
        _plot(best, args.plot, args.target, base, args.model)


def _plot(best: dict, path: Path, target: float, base: int | None, model: str = "2nn") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (_, _, label, accs) in best.items():
        ax.plot(range(1, len(accs) + 1), [100 * a for a in accs], label=f"{name} ({label})")
    ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
    if base:  # the goal: the best adaptive optimizer at the target by then
        ax.axvline(base / 2, color="grey", linestyle="--", linewidth=1,
                   label=f"half FedAvg's {base} rounds")
    ax.set_ylim(100 * target - 12, 100 * min(1.0, target + 0.015))  # the race to the target
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model.upper()}, pathological non-IID MNIST, K=100, C=0.1, E=1, B=10")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    import sys

    started = time.perf_counter()
    main(sys.argv[1:])
    print(f"({time.perf_counter() - started:.0f} s)")
