"""A real grid node for tests: uvicorn on a free loopback port, in a thread, with the
same uvicorn settings as ``gridfl serve``."""

from __future__ import annotations

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveNode:
    """``gridfl.server`` served by uvicorn on 127.0.0.1 until :meth:`stop`."""

    def __init__(self, settings) -> None:
        from gridfl.server import make_server

        self.settings = settings
        self.port = free_port()
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.server = make_server(
            settings, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the grid node did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        """The node's HTTP base URL."""
        return self.http_url

    @property
    def node(self):
        """The running ``GridNode`` (for tests that look inside)."""
        app = self.server.config.loaded_app
        while hasattr(app, "app") and not hasattr(app, "state"):
            app = app.app
        return app.state.node

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
