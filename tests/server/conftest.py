"""Fixtures of the grid node tests: the admin API client and plain HTTP / WebSocket
workers of a node (tests/conftest.py starts it; tests/harness.py has the classes).

``node`` is the live node over a real socket when the test needs one (a WebSocket
worker, or the test asks for ``server`` itself), else the same app in process."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("onnx")

from tests.harness import Admin, HttpWorker, WsWorker


@pytest.fixture(params=["http", "ws"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def node(request):
    """The node the test's ``admin`` and workers talk to (see the module docstring)."""
    needs_socket = "server" in request.fixturenames or (
        "transport" in request.fixturenames and request.getfixturevalue("transport") == "ws"
    )
    return request.getfixturevalue("server" if needs_socket else "in_process_node")


@pytest.fixture
def admin(node) -> Admin:
    return Admin(node.url)


@pytest.fixture
def worker_factory(node, transport):
    made = []

    def make(srv=None, kind: str | None = None):
        srv = srv or node
        kind = kind or transport
        w = HttpWorker(srv.url) if kind == "http" else WsWorker(srv.url, srv.ws_url)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()
