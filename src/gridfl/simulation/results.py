"""A simulation's results: ``results.json`` and a plot of its metrics per round."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RoundResult", "SimulationResult"]

log = logging.getLogger("gridfl.simulation")


@dataclass
class RoundResult:
    """One round: the clients that trained (in fold order), the mean of their last losses
    (weighted by ``num_samples``), and the new model's central and federated metrics
    (``seconds`` is the one field that differs between two runs with the same seed)."""

    round: int
    clients: list[int]
    seconds: float = 0.0
    train_loss: float | None = None
    central: dict[str, float] = field(default_factory=dict)
    federated: dict[str, float] = field(default_factory=dict)
    evaluated: list[int] = field(default_factory=list)  # the federated evaluation's clients
    error: str | None = None  # the strategy refused the aggregate: the model was kept
    #: with differential_privacy: epsilon spent after this round (null: infinite, z = 0),
    #: epsilon_next, the clip norm the round's reports were clipped to, the next one, and
    #: how many reports fit under it
    privacy: dict[str, Any] | None = None
    #: clients whose diff the node would refuse (NaN, infinite, beyond ±1e12): not folded
    refused: list[int] = field(default_factory=list)
    #: the round's model until it is evaluated (internal; not in results.json)
    model: list[np.ndarray] | None = field(default=None, repr=False)


@dataclass
class SimulationResult:
    """Everything a run produced; :meth:`save` writes ``results.json`` and ``results.png``.
    ``final_params`` (the last model) is not part of the JSON."""

    settings: dict[str, Any]
    rounds: list[RoundResult] = field(default_factory=list)
    startup_seconds: float | None = None  # call -> first aggregated model
    total_seconds: float | None = None
    peak_memory_mb: float | None = None  # PSS of this process and the local workers
    stop_reason: str | None = None  # why the run ended early ("privacy budget spent: ...")
    #: with target_accuracy: the first round whose model reached it (None: not reached)
    target_round: int | None = None
    final_params: list[np.ndarray] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["final_params"]
        for entry in data["rounds"]:
            del entry["model"]
        return data

    def save(self, out_dir: Path) -> tuple[Path, Path | None]:
        """Write ``results.json``, and ``results.png`` when matplotlib is installed (the
        ``demo`` extra); returns their paths (``None`` for a plot not drawn)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / "results.json"
        json_path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        if importlib.util.find_spec("matplotlib") is None:
            log.warning("no plot: matplotlib is not installed (pip install 'gridfl[demo]')")
            return json_path, None
        png_path = out_dir / "results.png"
        plot(self, png_path)
        return json_path, png_path


def plot(result: SimulationResult, path: Path) -> None:
    """One panel per metric: central and federated values (and the train loss) by round."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    keys = sorted({k for r in result.rounds for k in (*r.central, *r.federated)}) or ["loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, pick in (("central", "central"), ("federated", "federated")):
            pts = [(r.round, getattr(r, pick)[key]) for r in result.rounds
                   if key in getattr(r, pick)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="." if len(pts) <= 60 else None,
                        label=label)
        if key == "loss":
            train = [(r.round, r.train_loss) for r in result.rounds if r.train_loss is not None]
            if train:
                ax.plot(*zip(*train, strict=True), linestyle=":", label="train (clients)")
        ax.set(xlabel="round", ylabel=key, title=key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    s = result.settings
    fig.suptitle(f"gridfl simulation: {s.get('num_clients')} clients, {s.get('partitioner')}, "
                 f"{s.get('clients_per_round')} per round, seed {s.get('seed')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
