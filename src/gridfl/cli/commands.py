"""The ``gridfl`` commands besides ``serve``: demo, compile, host, status, retrieve, worker.

Each is a thin call into the library. User mistakes (bad options, unreachable node,
refused requests) end in one clear line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import runpy
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from gridfl._exceptions import ConfigError, GridflError

BUNDLE_FILE = "bundle.json"


def friendly(fn):
    """Turn gridfl errors and bad files into one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (GridflError, OSError, ValueError, KeyError) as exc:
            message = str(exc) or type(exc).__name__
            raise click.ClickException(message) from exc

    return wrapper


def admin_options(fn):
    """``URL`` plus the admin token (option, env GRIDFL_ADMIN_TOKEN, or a file)."""
    fn = click.option(
        "--admin-token-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        help="Read the admin token from this file (e.g. <data-dir>/admin-token).",
    )(fn)
    fn = click.option(
        "--admin-token", envvar="GRIDFL_ADMIN_TOKEN", default=None,
        help="The node's admin token [env GRIDFL_ADMIN_TOKEN].",
    )(fn)
    return click.argument("url")(fn)


def _token(admin_token: str | None, admin_token_file: Path | None) -> str:
    if admin_token_file is not None:
        return admin_token_file.read_text().strip()
    if admin_token:
        return admin_token
    raise ConfigError(
        "an admin token is needed: pass --admin-token, set GRIDFL_ADMIN_TOKEN, or use "
        "--admin-token-file <data-dir>/admin-token"
    )


def _host_client(url: str, admin_token: str | None, admin_token_file: Path | None):
    from gridfl.host import HostClient

    return HostClient(url, admin_token=_token(admin_token, admin_token_file))


# --------------------------------------------------------------------------- demo
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

    with Live(table, console=console, refresh_per_second=4) as live:

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


def _cycle_table(*, private: bool = False):
    from rich.table import Table

    table = Table(title="federated MNIST")
    for col in ("cycle", "reports", "cycle s", "elapsed s", "train loss", "test loss",
                "test acc", *(["epsilon"] if private else [])):
        table.add_column(col, justify="right")
    return table


def _add_row(table, c) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    row = [
        str(c.cycle), str(c.reports), fmt(c.seconds, ".2f"), fmt(c.elapsed, ".1f"),
        fmt(c.train_loss, ".4f"), fmt(c.test_loss, ".4f"),
        "-" if c.test_accuracy is None else f"{100 * c.test_accuracy:.2f}%",
    ]
    if len(table.columns) > len(row):  # the epsilon column (differential privacy)
        row.append(fmt(c.epsilon, ".4g"))
    table.add_row(*row)


# --------------------------------------------------------------------------- compile
@click.command(name="compile")
@click.argument("model_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write the plan bundle to.")
@click.option("--proximal-mu", type=click.FloatRange(0), default=None,
              help="FedProx: add mu/2 ||w - w_global||^2 to the loss and host with strategy "
                   "fedprox at this mu (overrides the file's proximal_mu).")
@friendly
def compile_(model_file: Path, out: Path, proximal_mu: float | None) -> None:
    """Compile MODEL_FILE (a Python file) into a plan bundle.

    The file defines ``model`` (a torch.nn.Module), ``example_data`` and
    ``example_target`` (one batch), and optionally ``loss`` ("cross_entropy",
    "cross_entropy_onehot" or "mse"; default cross_entropy), ``optimizer``
    (gridfl.compiler.SGD; default SGD(lr=0.1)), ``proximal_mu`` (FedProx), ``name``,
    ``version`` and ``client_config`` / ``server_config`` dicts to host it with.
    """
    bundle = compile_bundle(model_file, out, proximal_mu=proximal_mu)
    click.echo(f"wrote {out}: {', '.join(sorted(bundle['files']))}")


def compile_bundle(model_file: Path, out: Path, *, proximal_mu: float | None = None) -> dict:
    """Compile a model file into ``out`` (plans, initial model, bundle.json). With a
    ``proximal_mu`` (argument, else the file's) the training plan is FedProx's and the
    bundle's ``server_config.strategy`` fedprox at that mu, unless the file sets one."""
    from gridfl import state
    from gridfl.compiler import SGD, compile_evaluation_plan, compile_training_plan

    ns = runpy.run_path(str(model_file))
    missing = [k for k in ("model", "example_data", "example_target") if k not in ns]
    if missing:
        raise ConfigError(f"{model_file} must define {', '.join(missing)}")
    model, loss = ns["model"], ns.get("loss", "cross_entropy")
    optimizer = ns.get("optimizer", SGD(lr=0.1))
    mu = proximal_mu if proximal_mu is not None else ns.get("proximal_mu")
    training = compile_training_plan(
        model, loss=loss, optimizer=optimizer, example_data=ns["example_data"],
        example_target=ns["example_target"], proximal_mu=mu,
    )
    server_config = dict(ns.get("server_config", {}))
    if mu is not None:
        server_config.setdefault("strategy", {"name": "fedprox", "proximal_mu": mu})
    evaluation = compile_evaluation_plan(
        model, loss=loss, example_data=ns["example_data"], example_target=ns["example_target"]
    )
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "training_plan.onnx": training.to_bytes(),
        "evaluation_plan.onnx": evaluation.to_bytes(),
        "model.pb": state.dumps([p.detach().cpu().numpy() for p in model.parameters()]),
    }
    for fname, data in files.items():
        (out / fname).write_bytes(data)
    bundle = {
        "model": "model.pb",
        "plans": {"training_plan": "training_plan.onnx", "evaluation_plan": "evaluation_plan.onnx"},
        "client_config": {
            "name": ns.get("name", model_file.stem),
            "version": str(ns.get("version", "1.0")),
            "lr": getattr(optimizer, "lr", 0.1),
            **ns.get("client_config", {}),
        },
        "server_config": server_config,
        "files": sorted([*files, BUNDLE_FILE]),
    }
    (out / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2))
    return bundle


# --------------------------------------------------------------------------- host
@click.command()
@admin_options
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--name", default=None, help="Process name (overrides the bundle's).")
@click.option("--version", "version_", default=None, help="Process version.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), default=None,
              help="JSON file with client_config / server_config to merge in.")
@friendly
def host(url, admin_token, admin_token_file, source: Path, name, version_, config_file) -> None:
    """Host SOURCE (a plan bundle directory, or a Python model file) on the node at URL."""
    if source.is_file():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            bundle = compile_bundle(source, Path(tmp))
            payload = _bundle_payload(Path(tmp), bundle)
    else:
        bundle_path = source / BUNDLE_FILE
        if not bundle_path.exists():
            raise ConfigError(f"{source} is not a plan bundle (no {BUNDLE_FILE}); "
                              "make one with `gridfl compile`")
        payload = _bundle_payload(source, json.loads(bundle_path.read_text()))
    if config_file is not None:
        extra = json.loads(config_file.read_text())
        for key in ("client_config", "server_config"):
            payload[key].update(extra.get(key, {}))
    if name:
        payload["client_config"]["name"] = name
    if version_:
        payload["client_config"]["version"] = version_
    with _host_client(url, admin_token, admin_token_file) as client:
        client.host(**payload)
    cc = payload["client_config"]
    click.echo(f"hosted {cc['name']} {cc['version']} on {url}")


def _bundle_payload(folder: Path, bundle: dict) -> dict:
    return {
        "model": (folder / bundle["model"]).read_bytes(),
        "plans": {n: (folder / f).read_bytes() for n, f in bundle["plans"].items()},
        "client_config": dict(bundle["client_config"]),
        "server_config": dict(bundle.get("server_config", {})),
    }


# --------------------------------------------------------------------------- status
#: seconds a --follow request is held by the node waiting for the next cycle to close
_FOLLOW_HOLD = 30.0


@click.command()
@admin_options
@click.argument("name", required=False)
@click.argument("version", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@click.option("--follow", "-f", is_flag=True,
              help="Then print each cycle as it closes, until the process stops running "
                   "(with --json: one JSON object per cycle). Needs NAME.")
@friendly
def status(url, admin_token, admin_token_file, name, version, as_json, follow) -> None:
    """Processes on the node at URL, or the cycles and checkpoints of NAME [VERSION]."""
    from rich.console import Console
    from rich.table import Table

    if follow and not name:
        raise click.UsageError("--follow needs the NAME of a process")
    with _host_client(url, admin_token, admin_token_file) as client:
        data = client.status(name, version) if name else client.processes()
        if as_json:
            click.echo(json.dumps(data, indent=2))
        elif not name:
            table = Table(title=f"processes on {url}")
            for col in ("name", "version", "status", "cycle", "checkpoints"):
                table.add_column(col)
            for p in data:
                current = p.get("current_cycle") or p.get("current") or {}
                seq = current.get("sequence") if isinstance(current, dict) else current
                table.add_row(str(p.get("name")), str(p.get("version")), str(p.get("status")),
                              "-" if seq is None else str(seq), str(p.get("checkpoints", "-")))
            Console().print(table)
        else:
            table = Table(title=f"{data.get('name')} {data.get('version')}: {data.get('status')}")
            for col in _columns(data):
                table.add_column(col, justify="right")
            for c in data.get("cycles", []):
                table.add_row(*_cycle_row(c))
            Console().print(table)
            if data.get("strategy"):
                click.echo(_strategy_line(data["strategy"]))
            if data.get("privacy"):
                click.echo(_privacy_line(data["privacy"]))
            for e in data.get("evaluations") or []:
                click.echo(_evaluation_line(e))
        if follow:
            _follow(client, data, as_json)


def _strategy_line(strategy: dict) -> str:
    """``strategy: fedadam (eta=0.01, ...); state: step 3, m_norm 0.012, ...``

    >>> _strategy_line({"name": "fedadam", "params": {"eta": 0.01}, "state": {"step": 3}})
    'strategy: fedadam (eta=0.01); state: step 3'
    """
    params = ", ".join(f"{k}={v}" for k, v in (strategy.get("params") or {}).items()
                       if v is not None)
    line = f"strategy: {strategy.get('name')}" + (f" ({params})" if params else "")
    st = strategy.get("state") or {}
    if st:
        line += "; state: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in st.items())
    return line


_CYCLE_COLUMNS = ("cycle", "status", "accepted", "reported", "samples", "loss", "accuracy",
                  "checkpoint")


def _columns(data: dict) -> tuple[str, ...]:
    """The cycle columns, with ε after each cycle for a differentially private process."""
    return _CYCLE_COLUMNS + (("epsilon",) if data.get("privacy") else ())


def _cycle_row(c: dict) -> list[str]:
    m = c.get("metrics") or {}
    row = [
        str(c["sequence"]), c["status"], str(c["accepted"]), str(c["reported"]),
        str(c.get("num_samples", "-")),
        "-" if m.get("loss") is None else f"{m['loss']:.4f}",
        "-" if m.get("accuracy") is None else f"{m['accuracy']:.4f}",
        str(c.get("result_checkpoint") or "-"),
    ]
    if "epsilon" in c:  # null: not completed, or infinite (noise_multiplier 0)
        eps = c["epsilon"]
        row.append(f"{eps:.4g}" if eps is not None else "inf" if c["status"] == "completed"
                   else "-")
    return row


def _evaluation_line(e: dict) -> str:
    """One federated evaluation (docs/configs.md, ``evaluation``).

    >>> _evaluation_line({"checkpoint": 3, "reported": 2, "accepted": 2, "num_samples": 40,
    ...                   "metrics": {"loss": 0.25, "accuracy": 0.9}})
    'evaluation of checkpoint 3: 2/2 workers, 40 samples; loss 0.25, accuracy 0.9'
    """
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in e["metrics"].items()) or "no reports yet"
    return (f"evaluation of checkpoint {e['checkpoint']}: {e['reported']}/{e['accepted']} "
            f"workers, {e['num_samples']} samples; {metrics}")


def _privacy_line(p: dict) -> str:
    """One line of a process's privacy figures (docs/privacy.md)."""
    eps = "inf" if p["epsilon"] is None else f"{p['epsilon']:.4g}"
    budget = "" if p["max_epsilon"] is None else f" of max {p['max_epsilon']:g}"
    line = (f"privacy ({p['mode']}): epsilon {eps}{budget} at delta {p['delta']:g} after "
            f"{p['steps']} cycles ({p['accountant']}, q = {p['sampling_rate']:.4g}, "
            f"z = {p['noise_multiplier']:g}); clip norm {p['clip_norm']:.4g}")
    return line + (f"; finished: {p['reason']}" if p["budget_spent"] else "")


def _follow(client, data: dict, as_json: bool) -> None:
    """Print each cycle closing after ``data`` (a status), as soon as it closes."""
    from gridfl.host import closed_cycles

    name, version = data["name"], data["version"]
    seen = max((c["sequence"] for c in data["cycles"] if c["status"] != "open"), default=0)
    while data["status"] == "running":
        data, closed = closed_cycles(client, name, version, seen, wait=_FOLLOW_HOLD)
        for c in closed:
            seen = c["sequence"]
            if as_json:
                click.echo(json.dumps(c))
            else:
                click.echo("  ".join(f"{k} {v}" for k, v in zip(_columns(data), _cycle_row(c),
                                                               strict=True)))
    if not as_json:
        click.echo(f"{name} {version}: {data['status']}")


# --------------------------------------------------------------------------- retrieve
@click.command()
@admin_options
@click.argument("name")
@click.argument("version")
@click.option("--checkpoint", default="latest", show_default=True,
              help="Checkpoint number or alias.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file: .npz for numpy arrays (p0, p1, ...), else State bytes.")
@friendly
def retrieve(url, admin_token, admin_token_file, name, version, checkpoint, out: Path) -> None:
    """Download a checkpoint of NAME VERSION to a file."""
    from gridfl import state

    with _host_client(url, admin_token, admin_token_file) as client:
        data = client.retrieve_bytes(name, version, checkpoint)
    if out.suffix == ".npz":
        params = state.loads(data)
        np.savez(out, **{f"p{i}": p for i, p in enumerate(params)})  # type: ignore[arg-type]
    else:
        out.write_bytes(data)
    click.echo(f"wrote checkpoint {checkpoint} of {name} {version} to {out}")


# --------------------------------------------------------------------------- worker
@click.command()
@click.argument("url")
@click.argument("name")
@click.option("--version", "version_", default=None, help="Process version (default latest).")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), required=True, help=".npz with arrays 'x' and 'y'.")
@click.option("--auth-token", envvar="GRIDFL_AUTH_TOKEN", default=None,
              help="JWT for processes that require one [env GRIDFL_AUTH_TOKEN].")
@click.option("--plan", default="training_plan", show_default=True)
@click.option("--cycles", type=click.IntRange(1), default=None,
              help="Stop after this many reported cycles (default: until the node is done).")
@click.option("--allow-insecure", is_flag=True,
              help="Allow plain ws:// or http:// to a non-loopback host.")
@click.option("--eval-data", "eval_file", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), default=None,
              help=".npz with held-out arrays 'x' and 'y': also take evaluation cycles.")
@friendly
def worker(url, name, version_, data_file: Path, auth_token, plan, cycles, allow_insecure,
           eval_file: Path | None):
    """Train NAME on the node at URL with a local dataset, cycle after cycle."""
    from gridfl.client import run_worker

    x, y = _xy(data_file)
    summary = run_worker(
        url, name, x, y, model_version=version_, auth_token=auth_token, plan_name=plan,
        max_cycles=cycles, allow_insecure=allow_insecure or None,
        eval_data=None if eval_file is None else _xy(eval_file),
    )
    evaluated = f"; evaluated {summary.evaluations} checkpoint(s)" if eval_file else ""
    click.echo(f"reported {summary.cycles} cycle(s); last loss {summary.last_loss}"
               f"{evaluated}; {'the node is done' if summary.finished else 'stopped'}")


def _xy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as npz:
        if "x" not in npz.files or "y" not in npz.files:
            raise ConfigError(f"{path} must hold arrays 'x' and 'y' (has {npz.files})")
        return npz["x"], npz["y"]


COMMANDS = [demo, compile_, host, status, retrieve, worker]
