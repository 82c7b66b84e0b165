"""The gridfl grid node: a PyGrid-compatible model-centric FL server (extra ``server``).

    from gridfl.server import Settings, create_app, serve
    serve(Settings(data_dir="data", admin_token="..."), host="127.0.0.1", port=5000)

Worker API (HTTP under ``/model-centric/`` and WebSocket at ``/``) and the admin API
(``/gridfl/v1/``) are described in docs/protocol.md; server_config keys in docs/configs.md.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from gridfl._lazy import lazy_attributes as _lazy_attributes

if TYPE_CHECKING:
    from gridfl.server.app import create_app
    from gridfl.server.service import GridNode
    from gridfl.server.settings import Settings

#: imported on first use, so that a submodule (``gridfl.server.aggregate``, which the
#: simulation uses) does not pull the web app (FastAPI, SQLAlchemy) in with it
_LAZY = {"create_app": "gridfl.server.app", "GridNode": "gridfl.server.service",
         "Settings": "gridfl.server.settings"}


__all__ = ["GridNode", "Settings", "create_app", "make_server", "serve", "uvicorn_options"]
__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)


def uvicorn_options(settings: Settings) -> dict:
    """The uvicorn settings a node runs with (``serve`` and the test servers share them):
    the protocols of :mod:`gridfl.server.transport`, which bound each request's head, so
    that a node is safe to face devices without a proxy."""
    from gridfl.server.transport import protocol_options

    return {
        **protocol_options(settings.max_head_bytes, settings.max_headers, settings.head_timeout),
        "ws_max_size": settings.max_body_bytes,
        # Diffs are base64 floats: compressing them costs far more CPU than it saves.
        "ws_per_message_deflate": False,
        "ws_ping_interval": settings.ws_ping_interval,
        # with transport.WebSocketProtocol: seconds of silence after a ping
        "ws_ping_timeout": settings.read_idle_timeout,
        # syft.js in Node.js reuses an idle keep-alive connection after a long training
        # step and does not retry a report the server closed meanwhile (uvicorn: 5 s)
        "timeout_keep_alive": 30,
    }


def make_server(settings: Settings, **config: Any):
    """A ``uvicorn.Server`` running the node with :func:`uvicorn_options`; ``config`` goes
    to ``uvicorn.Config`` (host, port, log_level...). On shutdown (SIGINT, SIGTERM) it
    first answers the requests held for a cycle, which would otherwise keep it up for as
    long as they wait (up to 60 s), then stops as uvicorn does.

        >>> make_server(Settings(data_dir="data"), port=5000).run()  # doctest: +SKIP
    """
    import uvicorn

    from gridfl.server.app import create_app, release_held

    app = create_app(settings)

    class GridServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            await release_held(app)
            await super().shutdown(sockets)

    return GridServer(uvicorn.Config(app, **{**uvicorn_options(settings), **config}))


def serve(
    settings: Settings, *, host: str = "127.0.0.1", port: int = 5000, log_level: str = "info"
) -> None:
    """Run the node with uvicorn until interrupted."""
    server = make_server(settings, host=host, port=port, log_level=log_level.lower())
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:  # e.g. the port is taken: uvicorn has logged why
        raise SystemExit(3)
