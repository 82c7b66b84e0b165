"""Model poisoning against the aggregation rules, side by side in one run
(``python -m benchmarks.bench_poisoning [--model 2nn|cnn] [--rounds 20]``).

McMahan's MNIST workload (K = 100 IID shards, 10 clients per round, E = 1, B = 10,
lr 0.1, seed 0) in the simulation engine (:mod:`gridfl.simulation`: the node's own
strategies and diff checks, the same ONNX plans as real workers). In every round 2 of
the 10 clients are Byzantine and report, instead of their diff, the same poisoned diff
``gridfl demo --byzantine 2 --attack ...`` workers send: ``scale`` (x100), ``signflip``
(negated) or ``noise`` (Gaussian, 100x the diff's RMS per tensor).

Per aggregation rule (FedAvg without clipping, coordinate-wise median, trimmed mean with
beta 0.2, Krum with f = 2, Multi-Krum with f = 2 and m = 8), the test accuracy after the
last round with no attack and under each attack, and the points lost against the clean
FedAvg run (the goal: median, trimmed mean and Krum within 1 point; FedAvg visibly
degraded). A plot of test accuracy
per round, one panel per rule, goes to ``--plot``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.bench_simulation import _process
from gridfl.datasets import load_mnist
from gridfl.demo.worker import ATTACKS
from gridfl.simulation import SimulationOptions, simulate

BYZANTINE = 2
PER_ROUND = 10
RULES = {
    "fedavg": None,
    "fedmedian": {"name": "fedmedian"},
    "fedtrimmedavg": {"name": "fedtrimmedavg", "beta": 0.2},
    "krum": {"name": "krum", "num_malicious_nodes": BYZANTINE},
    # Blanchard et al.'s m = n - f: the mean of the diffs Krum scores as honest
    "multikrum": {"name": "multikrum", "num_malicious_nodes": BYZANTINE,
                  "num_nodes_to_select": PER_ROUND - BYZANTINE},
}


def curve(process: dict, mnist, rule: str, attack: str | None, rounds: int,
          lr: float = 0.1) -> list[float]:
    """Central test accuracy after each round (clients train at ``lr``)."""
    server_config = {"max_diffs": PER_ROUND, "min_diffs": PER_ROUND,
                     "strategy": RULES[rule]}
    result = simulate(
        **{**process, "server_config": server_config,
           "client_config": {**process["client_config"], "lr": lr}},
        data=(mnist.x_train, mnist.y_train), test_data=(mnist.x_test, mnist.y_test),
        options=SimulationOptions(
            num_clients=100, rounds=rounds, clients_per_round=PER_ROUND, seed=0, workers=2,
            byzantine=BYZANTINE if attack else 0, attack=attack or "scale",
        ),
    )
    return [float(r.central.get("accuracy", float("nan"))) if r.central else float("nan")
            for r in result.rounds]


def plot(curves: dict[tuple[str, str], list[float]], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RULES), figsize=(4 * len(RULES), 3.6), sharey=True)
    clean = curves[("fedavg", "none")]
    for ax, rule in zip(axes, RULES, strict=True):
        ax.plot(range(1, len(clean) + 1), [100 * a for a in clean], "k--", label="clean FedAvg")
        for attack in ("none", *ATTACKS):
            if (rule, attack) in curves and (rule, attack) != ("fedavg", "none"):
                acc = curves[(rule, attack)]
                ax.plot(range(1, len(acc) + 1), [100 * a for a in acc],
                        label="no attack" if attack == "none" else attack)
        ax.set_title(rule)
        ax.set_xlabel("round")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{model.upper()}, MNIST IID, {BYZANTINE} of {PER_ROUND} clients Byzantine "
                 "per round", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["2nn", "cnn"], default="cnn")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    parser.add_argument("--clean-robust", action="store_true",
                        help="also run each robust rule without an attack")
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    parser.add_argument("--rule-lr", type=float, default=0.1,
                        help="client lr of every run but the clean FedAvg one (lr 0.1): "
                        "Krum's step is one client's diff, the paper tunes its rate")
    parser.add_argument("--plot", type=Path, default=None,
                        help="default: results/poisoning-<model>.png")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.rule_lr <= 0:
        parser.error("--rounds must be >= 1 and --rule-lr > 0")
    mnist = load_mnist()
    process = _process(args.model, mnist, 10)
    print(f"{args.model.upper()}, MNIST IID K=100, {PER_ROUND} clients/round "
          f"({BYZANTINE} Byzantine), E=1, B=10, lr 0.1, seed 0; test accuracy after "
          f"{args.rounds} rounds; the rules' clients at lr {args.rule_lr:g}", flush=True)
    curves: dict[tuple[str, str], list[float]] = {}
    runs = [("fedavg", "none")]
    for rule in args.rules:
        if rule != "fedavg" and args.clean_robust:
            runs.append((rule, "none"))
        runs += [(rule, attack) for attack in args.attacks]
    for rule, attack in runs:
        started = time.perf_counter()
        curves[(rule, attack)] = curve(process, mnist, rule,
                                       None if attack == "none" else attack, args.rounds,
                                       0.1 if (rule, attack) == ("fedavg", "none")
                                       else args.rule_lr)
        final = curves[(rule, attack)][-1]
        clean = curves[("fedavg", "none")][-1]
        print(f"  {rule:14} {attack:9} {100 * final:6.2f} %  ({100 * (final - clean):+6.2f} "
              f"points vs clean FedAvg)  [{time.perf_counter() - started:.0f} s]", flush=True)
    print(f"\n| rule | {' | '.join(['no attack', *ATTACKS])} |")
    print(f"|---|{'---|' * (1 + len(ATTACKS))}")
    for rule in args.rules:
        cells = [f"{100 * curves[(rule, a)][-1]:.2f}%" if (rule, a) in curves else "-"
                 for a in ("none", *ATTACKS)]
        print(f"| {rule} | {' | '.join(cells)} |")
    plot(curves, args.model, args.plot or Path(f"results/poisoning-{args.model}.png"))


if __name__ == "__main__":
    main()
