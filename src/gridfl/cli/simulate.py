"""``gridfl simulate``: a plan bundle over virtual clients (see :mod:`gridfl.simulation`)."""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

import click

from gridfl._exceptions import ConfigError
from gridfl.cli.bundle import BUNDLE_FILE, bundle_payload, compile_bundle
from gridfl.cli.common import friendly

_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


def user_partitioner(spec: str):
    """``module:function`` -> the function (``gridfl simulate --partitioner``)."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"partitioner {spec!r}: cannot import {name} from {module}: {exc}"
                          ) from exc
    if not callable(fn):
        raise ConfigError(f"partitioner {spec!r} is not a function")
    return fn


def _payload(source: Path, config_file: Path | None) -> dict[str, Any]:
    if source.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            payload = bundle_payload(Path(tmp), compile_bundle(source, Path(tmp)))
    else:
        if not (source / BUNDLE_FILE).exists():
            raise ConfigError(f"{source} is not a plan bundle (no {BUNDLE_FILE}); "
                              "make one with `gridfl compile`")
        payload = bundle_payload(source, json.loads((source / BUNDLE_FILE).read_text()))
    if config_file is not None:
        extra = json.loads(config_file.read_text())
        for key in ("client_config", "server_config"):
            payload[key].update(extra.get(key, {}))
    return payload


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--data", "data_file", type=_FILE, required=True,
              help=".npz with arrays 'x' and 'y': the population's examples.")
@click.option("--test", "test_file", type=_FILE, default=None,
              help=".npz with arrays 'x' and 'y' for central evaluation.")
@click.option("--config", "config_file", type=_FILE, default=None,
              help="JSON file with client_config / server_config to merge in.")
@click.option("--clients", "-N", type=int, default=100, show_default=True,
              help="Number of virtual clients.")
@click.option("--partitioner", default="iid", show_default=True,
              help="iid, shards, dirichlet, or module:function f(labels, num_clients, rng).")
@click.option("--alpha", type=float, default=None, help="Dirichlet concentration (> 0).")
@click.option("--shards-per-client", type=int, default=None,
              help="Shards per client for --partitioner shards (default 2).")
@click.option("--rounds", type=int, default=None,
              help="Rounds to run [default: server_config.num_cycles].")
@click.option("--per-round", type=int, default=None,
              help="Clients trained per round [default: server_config.max_diffs].")
@click.option("--evaluate-every", type=int, default=1, show_default=True,
              help="Rounds between central evaluations (with --test).")
@click.option("--target-accuracy", type=float, default=None,
              help="Stop once the central accuracy (with --test) reaches this (0 to 1); "
              "evaluated every round once within 0.01 of it.")
@click.option("--federated-every", type=int, default=None,
              help="Rounds between federated evaluations on the clients' held-out data.")
@click.option("--federated-clients", type=int, default=None,
              help="Clients per federated evaluation [default: --per-round].")
@click.option("--held-out", type=float, default=None,
              help="Share of each client's examples held out for federated evaluation "
              "[default: 0.1 with --federated-every, else 0].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=None,
              help="Worker processes (local) or CPUs of a local Ray [default: one per core].")
@click.option("--backend", default="local", show_default=True, help="local or ray.")
@click.option("--ray-address", default=None,
              help="Address of a running Ray cluster (ray://host:10001 or auto).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True,
              help="Directory for results.json and results.png.")
@friendly
def simulate(source: Path, data_file: Path, test_file: Path | None,
             config_file: Path | None, **kw: Any) -> None:
    """Simulate SOURCE (a plan bundle directory or a Python model file, as `gridfl host`
    takes) over virtual clients made from --data, aggregated as the node aggregates."""
    from gridfl.simulation import PARTITIONERS, SimulationOptions
    from gridfl.simulation import simulate as run

    part = kw["partitioner"]
    if ":" in part:
        part = user_partitioner(part)
    elif part not in PARTITIONERS:
        raise ConfigError(f"unknown partitioner {part!r}: choose one of "
                          f"{', '.join(PARTITIONERS)} or module:function")
    popts: dict[str, Any] = {}
    if kw["alpha"] is not None:
        popts["alpha"] = kw["alpha"]
    if kw["shards_per_client"] is not None:
        popts["shards_per_client"] = kw["shards_per_client"]
    options = SimulationOptions(
        num_clients=kw["clients"], partitioner=part, partition_options=popts,
        rounds=kw["rounds"], clients_per_round=kw["per_round"],
        evaluate_every=kw["evaluate_every"], target_accuracy=kw["target_accuracy"],
        federated_every=kw["federated_every"],
        federated_clients=kw["federated_clients"], held_out=kw["held_out"], seed=kw["seed"],
        workers=kw["workers"], backend=kw["backend"], ray_address=kw["ray_address"],
        out_dir=kw["out_dir"], progress=True,
    )
    result = run(**_payload(source, config_file), data=data_file, test_data=test_file,
                 options=options)
    last = result.rounds[-1]
    if options.target_accuracy is not None:
        click.echo(f"target accuracy {options.target_accuracy}: " + (
            f"reached at round {result.target_round}" if result.target_round is not None
            else f"not reached in {len(result.rounds)} rounds"))
    click.echo(f"{len(result.rounds)} rounds in {result.total_seconds} s "
               f"(start-up {result.startup_seconds} s); last central {last.central or '-'}, "
               f"federated {last.federated or '-'}; results in {kw['out_dir']}/results.json")
