"""``gridfl worker``: train a hosted process on a local dataset."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from gridfl._exceptions import ConfigError
from gridfl.cli.common import friendly


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
@click.option("--secagg-key", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Secure aggregation with signed keys: this worker's Ed25519 "
              "identity key (PEM; `openssl genpkey -algorithm ed25519`).")
@click.option("--secagg-credential", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), default=None,
              help="The authority's credential (a JWT) for --secagg-key.")
@click.option("--secagg-authority", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), default=None,
              help="The authority's RSA public key (PEM), got from the authority, never from "
              "the node: neighbours' keys are checked against it.")
@friendly
def worker(url, name, version_, data_file: Path, auth_token, plan, cycles, allow_insecure,
           eval_file: Path | None, secagg_key: Path | None, secagg_credential: Path | None,
           secagg_authority: Path | None):
    """Train NAME on the node at URL with a local dataset, cycle after cycle."""
    from gridfl.client import run_worker

    x, y = _xy(data_file)
    summary = run_worker(
        url, name, x, y, model_version=version_, auth_token=auth_token, plan_name=plan,
        max_cycles=cycles, allow_insecure=allow_insecure or None,
        eval_data=None if eval_file is None else _xy(eval_file),
        **_secagg_options(secagg_key, secagg_credential, secagg_authority),
    )
    evaluated = f"; evaluated {summary.evaluations} checkpoint(s)" if eval_file else ""
    click.echo(f"reported {summary.cycles} cycle(s); last loss {summary.last_loss}"
               f"{evaluated}; {'the node is done' if summary.finished else 'stopped'}")


def _xy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as npz:
        if "x" not in npz.files or "y" not in npz.files:
            raise ConfigError(f"{path} must hold arrays 'x' and 'y' (has {npz.files})")
        return npz["x"], npz["y"]


def _secagg_options(key: Path | None, credential: Path | None, authority: Path | None) -> dict:
    from gridfl.secagg.identity import Identity

    if (key is None) != (credential is None):
        raise ConfigError("--secagg-key and --secagg-credential go together: the credential "
                          "certifies the key")
    options: dict = {}
    if key is not None and credential is not None:
        options["secagg_identity"] = Identity.from_pem(key.read_bytes(), credential.read_text())
    if authority is not None:
        options["secagg_authority"] = authority.read_text()
    return options
