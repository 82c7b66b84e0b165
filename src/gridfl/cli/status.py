"""``gridfl status`` and ``gridfl retrieve``: what a node is doing, and its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from gridfl.cli.common import admin_options, friendly, host_client

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
    with host_client(url, admin_token, admin_token_file) as client:
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
        str(c["sequence"]), "closing" if c.get("closing") else c["status"],
        str(c["accepted"]), str(c["reported"]),
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
    z, accounted = p["noise_multiplier"], p.get("accounted_noise_multiplier")
    # under secure aggregation dropouts lower the noise the accountant charges
    charged = "" if accounted in (None, z) else f", accounted {accounted:.4g}"
    line = (f"privacy ({p['mode']}): epsilon {eps}{budget} at delta {p['delta']:g} after "
            f"{p['steps']} cycles ({p['accountant']}, q = {p['sampling_rate']:.4g}, "
            f"z = {z:g}{charged}); clip norm {p['clip_norm']:.4g}")
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

    with host_client(url, admin_token, admin_token_file) as client:
        data = client.retrieve_bytes(name, version, checkpoint)
    if out.suffix == ".npz":
        params = state.loads(data)
        np.savez(out, **{f"p{i}": p for i, p in enumerate(params)})  # type: ignore[arg-type]
    else:
        out.write_bytes(data)
    click.echo(f"wrote checkpoint {checkpoint} of {name} {version} to {out}")
