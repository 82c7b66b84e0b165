"""``gridfl demo``: MNIST training on a local node with worker processes."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from gridfl.cli.common import friendly


@click.command()
@click.option("--model", type=click.Choice(["cnn", "2nn"]), default="cnn", show_default=True)
@click.option("--clients", "-K", type=click.IntRange(1), default=100, show_default=True,
              help="Number of clients (MNIST shards).")
@click.option("--fraction", "-C", type=click.FloatRange(0, 1, min_open=True), default=0.1,
              show_default=True, help="Fraction of clients trained per cycle.")
@click.option("--epochs", "-E", type=click.IntRange(1), default=1, show_default=True,
              help="Local epochs per cycle.")
@click.option("--batch-size", "-B", type=click.IntRange(1), default=10, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.1, show_default=True)
@click.option("--cycles", type=click.IntRange(1), default=20, show_default=True,
              help="Stop after this many cycles.")
@click.option("--target", type=click.FloatRange(0, 1), default=0.98, show_default=True,
              help="Stop once the test accuracy reaches this.")
@click.option("--non-iid", is_flag=True, help="McMahan's pathological non-IID split.")
@click.option("--workers", type=click.IntRange(1), default=10, show_default=True,
              help="Worker processes sharing the clients.")
@click.option("--parallel", type=click.IntRange(0), default=None,
              help="Workers training at once, as devices would on cores of their own "
                   "(default: the CPU count; 0: no limit).")
@click.option("--examples-per-client", type=click.IntRange(1), default=None,
              help="Cut each shard (quick runs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dp-noise", type=click.FloatRange(0), default=None,
              help="Differential privacy: noise multiplier z (needs --dp-clip; "
                   "docs/privacy.md).")
@click.option("--dp-clip", type=click.FloatRange(0, min_open=True), default=None,
              help="Differential privacy: clip norm C of each diff (the initial one with "
                   "--dp-adaptive).")
@click.option("--dp-adaptive", is_flag=True,
              help="Adapt the clip norm to the median update norm (Andrew et al.).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("data/demo"), show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--no-live-eval", is_flag=True,
              help="Evaluate checkpoints after training instead of during it.")
@click.option("--secure-aggregation", is_flag=True,
              help="Host with secure aggregation: the node learns only each cycle's sum.")
@click.option("--strategy", default="fedavg", show_default=True,
              help="server_config.strategy name: fedavg, fedavgm, fedadagrad, fedadam, fedyogi, "
              "fedprox, fedmedian, fedtrimmedavg, krum, multikrum or bulyan (docs/configs.md).")
@click.option("--proximal-mu", type=click.FloatRange(0), default=None,
              help="FedProx: compile the plan with mu/2 ||w - w_global||^2 and host it with "
                   "strategy fedprox (docs/configs.md).")
@click.option("--server-lr", type=click.FloatRange(0, min_open=True), default=None,
              help="A server optimizer's rate (eta; server_learning_rate for fedavgm).")
@click.option("--byzantine", type=click.IntRange(0), default=0, show_default=True,
              help="Worker processes that report poisoned diffs.")
@click.option("--attack", type=click.Choice(["scale", "signflip", "noise"]), default="scale",
              show_default=True, help="What they send: x100, sign flipped, or large noise.")
@click.option("--compression", type=click.Choice(["float16", "int8", "topk"]), default=None,
              help="Workers send compressed diffs (topk: 10%, with error feedback).")
@click.option("--async", "asynchronous", is_flag=True,
              help="Buffered asynchronous training (FedBuff, server_config.mode 'async').")
@click.option("--buffer-size", type=click.IntRange(1), default=10, show_default=True,
              help="With --async: reports per published checkpoint.")
@click.option("--slow-workers", type=click.IntRange(0), default=0, show_default=True,
              help="Worker processes that are --slowdown times slower.")
@click.option("--slowdown", type=click.FloatRange(1, 100), default=5.0, show_default=True,
              help="How much slower the slow workers are.")
@click.option("--federated-every", type=click.IntRange(1), default=None,
              help="Federated evaluation of every N-th checkpoint on the workers' held-out "
                   "10% of their examples, plotted next to the central one.")
@friendly
def demo(**kw: Any) -> None:
    """Federated MNIST: a grid node, N worker processes, a results table and a plot."""
    from rich.console import Console
    from rich.live import Live

    from gridfl.demo.run import DemoOptions, run_demo

    options = DemoOptions(
        model=kw["model"], clients=kw["clients"], fraction=kw["fraction"],
        epochs=kw["epochs"], batch_size=kw["batch_size"], lr=kw["lr"], cycles=kw["cycles"],
        target=kw["target"], iid=not kw["non_iid"], seed=kw["seed"], workers=kw["workers"],
        parallel=kw["parallel"], examples_per_client=kw["examples_per_client"],
        evaluate=not kw["no_live_eval"], compression=kw["compression"],
        secure_aggregation=kw["secure_aggregation"],
        data_dir=kw["data_dir"], out_dir=kw["out_dir"], strategy=kw["strategy"],
        server_lr=kw["server_lr"], proximal_mu=kw["proximal_mu"], byzantine=kw["byzantine"],
        attack=kw["attack"],
        dp_noise=kw["dp_noise"], dp_clip=kw["dp_clip"], dp_adaptive=kw["dp_adaptive"],
        asynchronous=kw["asynchronous"], buffer_size=kw["buffer_size"],
        slow_workers=kw["slow_workers"], slowdown=kw["slowdown"],
        federated_every=kw["federated_every"],
    )
    console = Console(stderr=True)
    console.print(
        f"[bold]gridfl demo[/]: {options.model}, K={options.clients}, C={options.fraction}, "
        f"E={options.epochs}, B={options.batch_size}, lr={options.lr}, "
        f"{'IID' if options.iid else 'non-IID'}, {options.workers} worker processes, "
        f"strategy {options.strategy_config() or 'fedavg'}"
        + (f", async (buffers of {options.buffer_size})" if options.asynchronous else "")
        + (f", {options.slow_workers} {options.slowdown:g}x slower" if options.slow_workers
           else "")
        + (f", {options.byzantine} Byzantine ({options.attack})" if options.byzantine else "")
        + (f", {options.compression} reports" if options.compression else "")
    )
    table = _cycle_table(private=options.dp_noise is not None)
    started = time.perf_counter()

    def on_step(message: str) -> None:  # start-up takes a while: show where it is
        console.print(f"[dim]{time.perf_counter() - started:5.1f} s[/]  {message}...")

    with _stopped_by_sigterm(), Live(table, console=console, refresh_per_second=4) as live:

        def on_cycle(c) -> None:
            _add_row(table, c)
            live.update(table)

        def on_dashboard(url: str, token_file: Path) -> None:
            console.print(
                f"[bold]dashboard[/]: {url} (while the demo runs; sign in with the admin "
                f"token in {token_file})"
            )

        result = run_demo(
            options, on_cycle=on_cycle, on_step=on_step, on_dashboard=on_dashboard
        )
    if not options.evaluate:
        table = _cycle_table(private=options.dp_noise is not None)
        for c in result.cycles:
            _add_row(table, c)
        console.print(table)
    best = max((c.test_accuracy or 0 for c in result.cycles), default=0)
    console.print(
        f"{len(result.cycles)} cycles in {time.perf_counter() - started:.0f} s; best test "
        f"accuracy {100 * best:.2f}%; first checkpoint {result.startup_seconds} s after the "
        f"node was up"
    )
    console.print(
        f"peak memory of node + workers: {result.peak_pss_mb} MB physical (sum of PSS); "
        f"{result.peak_rss_mb} MB sum of RSS, which counts shared libraries once per process"
    )
    console.print(f"results: {options.out_dir / 'results.json'}, plot: "
                  f"{options.out_dir / 'accuracy.png'}")


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM (``kill``, a CI timeout, ``docker stop``) stops the demo as Ctrl-C does:
    its node and workers are stopped too, not left running on their own."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cycle_table(*, private: bool = False):
    from rich.table import Table

    table = Table(title="federated MNIST")
    for col in ("cycle", "reports", "cycle s", "elapsed s", "train loss", "test loss",
                "test acc", *(["epsilon", "clip C"] if private else [])):
        table.add_column(col, justify="right")
    return table


def _add_row(table, c) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    row = [
        str(c.cycle), str(c.reports), fmt(c.seconds, ".2f"), fmt(c.elapsed, ".1f"),
        fmt(c.train_loss, ".4f"), fmt(c.test_loss, ".4f"),
        "-" if c.test_accuracy is None else f"{100 * c.test_accuracy:.2f}%",
    ]
    if len(table.columns) > len(row):  # differential privacy: epsilon and the clip norm
        row += [fmt(c.epsilon, ".4g"), fmt(c.clip_norm, ".4g")]
    table.add_row(*row)
