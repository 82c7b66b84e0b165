"""The ``gridfl`` command: a thin click group; each command calls into the library."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

try:
    import click
except ImportError:  # pragma: no cover

    def main() -> None:
        sys.exit("the gridfl command needs the 'cli' extra: pip install 'gridfl[cli]'")
else:

    @click.group()
    @click.version_option(package_name="gridfl")
    def main() -> None:
        """gridfl: static federated learning."""

    @main.command()  # type: ignore[attr-defined]  # a click group here
    @click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
    @click.option("--port", default=5000, show_default=True, type=int)
    @click.option(
        "--data-dir",
        default="data",
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory of the embedded SQLite database (and the generated admin token).",
    )
    @click.option(
        "--database-url",
        envvar="GRIDFL_DATABASE_URL",
        default=None,
        help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
        "[default: sqlite file in --data-dir; env GRIDFL_DATABASE_URL]",
    )
    @click.option(
        "--admin-token",
        envvar="GRIDFL_ADMIN_TOKEN",
        default=None,
        help="Admin API bearer token [env GRIDFL_ADMIN_TOKEN].",
    )
    @click.option(
        "--admin-token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Read the admin token from this file. Without any token, one is generated "
        "and written to <data-dir>/admin-token.",
    )
    @click.option(
        "--max-body-mb",
        default=64,
        show_default=True,
        type=int,
        help="Largest worker request (a report of the 1.66M-param CNN is ~9 MB).",
    )
    @click.option(
        "--body-buffer-mb",
        default=256,
        show_default=True,
        type=click.IntRange(1),
        help="Worker request bodies held in memory at once, all connections together "
        "(more wait, then get 503).",
    )
    @click.option(
        "--read-idle-timeout",
        default=60.0,
        show_default=True,
        type=click.FloatRange(0, min_open=True),
        help="Seconds of silence from a client sending a body (408) or a WebSocket frame "
        "(closed) before giving up on it.",
    )
    @click.option(
        "--close-timeout",
        default=10.0,
        show_default=True,
        type=click.FloatRange(0, min_open=True),
        help="Durability 'cycle' with several server processes: seconds a ready cycle "
        "waits for the other processes' partial sums before it expires.",
    )
    @click.option(
        "--speed-test-mb",
        default=64,
        show_default=True,
        type=int,
        help="Size of the speed-test download.",
    )
    @click.option(
        "--log-level",
        default="info",
        show_default=True,
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    )
    @click.option(
        "--log-format",
        default="text",
        show_default=True,
        type=click.Choice(["text", "json"]),
        help="json: one JSON object per line, for log collectors.",
    )
    def serve(
        host,
        port,
        data_dir,
        database_url,
        admin_token,
        admin_token_file,
        max_body_mb,
        body_buffer_mb,
        read_idle_timeout,
        close_timeout,
        speed_test_mb,
        log_level,
        log_format,
    ) -> None:
        """Run a grid node (HTTP + WebSocket) until interrupted."""
        from gridfl.server import Settings
        from gridfl.server import serve as run
        from gridfl.server.logs import configure

        configure(log_level, log_format)
        if admin_token_file is not None:
            admin_token = admin_token_file.read_text().strip()
        if not admin_token:
            data_dir.mkdir(parents=True, exist_ok=True)
            path = data_dir / "admin-token"
            if path.exists():
                admin_token = path.read_text().strip()
            else:
                admin_token = secrets.token_urlsafe(32)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(admin_token + "\n")
            click.echo(f"gridfl: admin token in {path}", err=True)
        settings = Settings(
            data_dir=data_dir,
            database_url=database_url,
            admin_token=admin_token,
            max_body_bytes=max_body_mb * 1024 * 1024,
            body_buffer_bytes=body_buffer_mb * 1024 * 1024,
            read_idle_timeout=read_idle_timeout,
            close_timeout=close_timeout,
            speed_test_bytes=speed_test_mb * 1024 * 1024,
            # test-only fault injection (tests/faults); the one place it is read
            test_crash_at=os.environ.get("GRIDFL_TEST_CRASH_AT") or None,
        )
        run(settings, host=host, port=port, log_level=log_level)

    from gridfl.cli.commands import COMMANDS
    from gridfl.cli.simulate import simulate

    for _command in [*COMMANDS, simulate]:
        main.add_command(_command)  # type: ignore[attr-defined]  # a click group here
