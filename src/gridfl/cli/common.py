"""What the ``gridfl`` commands share: one-line errors and the admin options."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from gridfl._exceptions import ConfigError, GridflError


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


def read_admin_token(admin_token: str | None, admin_token_file: Path | None) -> str:
    if admin_token_file is not None:
        return admin_token_file.read_text().strip()
    if admin_token:
        return admin_token
    raise ConfigError(
        "an admin token is needed: pass --admin-token, set GRIDFL_ADMIN_TOKEN, or use "
        "--admin-token-file <data-dir>/admin-token"
    )


def host_client(url: str, admin_token: str | None, admin_token_file: Path | None):
    from gridfl.host import HostClient

    return HostClient(url, admin_token=read_admin_token(admin_token, admin_token_file))
