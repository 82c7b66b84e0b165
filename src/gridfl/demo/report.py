"""Results of a federated run: a JSON file, a PNG plot and a final table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class CycleResult:
    """One aggregated cycle as the demo saw it."""

    cycle: int
    checkpoint: int  # the checkpoint the cycle produced
    reports: int
    seconds: float  # wall time of the cycle on the node (start to aggregated checkpoint)
    elapsed: float  # seconds since the node was up
    train_loss: float | None = None  # mean of the losses workers reported
    test_loss: float | None = None
    test_accuracy: float | None = None
    epsilon: float | None = None  # privacy spent after the cycle (differential privacy)
    # federated evaluation: the node's weighted mean over the workers' held-out data
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    # differential privacy: the clip norm C the node clipped the cycle's reports to, the
    # L2 norms of the diffs the workers sent (logged by the demo's own workers), and their
    # target quantile, which adaptive clipping steers C toward
    clip_norm: float | None = None
    update_norms: list[float] = field(default_factory=list)
    norm_quantile: float | None = None


@dataclass
class RunResult:
    """Everything a run produced; ``save`` writes ``results.json`` and ``accuracy.png``."""

    settings: dict
    cycles: list[CycleResult] = field(default_factory=list)
    startup_seconds: float | None = None  # node up (healthy) -> first aggregated checkpoint
    node_boot_seconds: float | None = None  # node process start -> healthy
    host_seconds: float | None = None  # hosting the process (inside startup_seconds)
    #: when the node closed the first aggregated cycle (Unix time, this machine's clock):
    #: start-up as a user waits for it is this minus when the command was typed
    first_checkpoint_at: float | None = None
    # Peak memory of the node + workers, sampled while cycles run. RSS sums count the
    # libraries every process maps (onnxruntime, numpy) once per process; PSS shares each
    # page among its processes, so the PSS sum is the physical memory the run used.
    peak_rss_mb: float | None = None  # sum of RSS (double counts shared pages)
    peak_pss_mb: float | None = None  # sum of PSS (the honest total)
    # Per process peaks: node_rss, node_pss, worker_rss, worker_pss (the largest worker).
    memory_mb: dict[str, float] = field(default_factory=dict)

    def rounds_to(self, accuracy: float) -> int | None:
        """First cycle whose global model reached ``accuracy`` on the test set."""
        for c in self.cycles:
            if c.test_accuracy is not None and c.test_accuracy >= accuracy:
                return c.cycle
        return None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["rounds_to"] = {f"{a:.2f}": self.rounds_to(a) for a in (0.97, 0.98, 0.99)}
        return data

    def save(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / "results.json"
        json_path.write_text(json.dumps(self.to_dict(), indent=2))
        png_path = out_dir / "accuracy.png"
        plot(self, png_path)
        return json_path, png_path


def plot(result: RunResult, path: Path) -> None:
    """Test accuracy and loss per cycle, side by side; with differential privacy, also
    test accuracy against the ε spent, and the clip norm against the update norms."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    done = [c for c in result.cycles if c.test_accuracy is not None]
    xs = [c.cycle for c in done]
    marker = "o" if len(done) <= 60 else None  # long runs: a line reads better than dots
    private = [c for c in done if c.epsilon is not None]
    clipped = [c for c in result.cycles if c.clip_norm is not None and c.norm_quantile is not None]
    panels = 2 + bool(private) + bool(clipped)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    if clipped:
        _plot_clipping(axes[-1], clipped, result.settings.get("dp_target_quantile"), marker)
    ax_acc, ax_loss = axes[0], axes[1]
    if private:
        axes[2].plot([c.epsilon for c in private],
                     [100 * (c.test_accuracy or 0.0) for c in private], marker=marker)
        axes[2].set(xlabel="epsilon spent", ylabel="test accuracy (%)",
                    title="Accuracy against privacy")
        axes[2].grid(alpha=0.3)
    ax_acc.plot(xs, [100 * (c.test_accuracy or 0.0) for c in done], marker=marker,
                label="central (10k test set)")
    federated = [c for c in result.cycles if c.federated_accuracy is not None]
    if federated:
        ax_acc.plot([c.cycle for c in federated],
                    [100 * (c.federated_accuracy or 0.0) for c in federated],
                    marker="s" if marker else None, label="federated (workers' held-out data)")
        ax_acc.legend()
    title = "Global model: central and federated" if federated else (
        "Global model on the 10k test set")
    ax_acc.set(xlabel="cycle", ylabel="test accuracy (%)", title=title)
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(xs, [c.test_loss for c in done], marker=marker, label="test")
    train = [(c.cycle, c.train_loss) for c in result.cycles if c.train_loss is not None]
    if train:
        ax_loss.plot(
            *zip(*train, strict=True), marker="." if marker else None, label="train (workers)"
        )
    if federated:
        ax_loss.plot([c.cycle for c in federated], [c.federated_loss for c in federated],
                     marker="s" if marker else None, label="federated evaluation")
    ax_loss.set(xlabel="cycle", ylabel="cross-entropy loss", title="Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    s = result.settings
    fig.suptitle(
        f"gridfl federated MNIST: {s.get('model')} K={s.get('clients')} C={s.get('fraction')} "
        f"E={s.get('epochs')} B={s.get('batch_size')} {'IID' if s.get('iid') else 'non-IID'}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_clipping(ax, cycles: list[CycleResult], target, marker) -> None:
    """The clip norm the node used per cycle, over the workers' update norms and their
    target quantile (adaptive clipping steers C toward it)."""
    for c in cycles:
        ax.scatter([c.cycle] * len(c.update_norms), c.update_norms, s=6, color="0.7",
                   label="update norms" if c is cycles[0] else None)
    xs = [c.cycle for c in cycles]
    ax.plot(xs, [c.norm_quantile for c in cycles], marker="." if marker else None,
            label=f"{target} quantile of the norms")
    ax.plot(xs, [c.clip_norm for c in cycles], marker=marker, label="clip norm C")
    ax.set(xlabel="cycle", ylabel="L2 norm", title="Clipping")
    ax.legend()
    ax.grid(alpha=0.3)
