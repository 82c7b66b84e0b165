"""Fixtures of the grid node tests: the admin API client and plain HTTP / WebSocket
workers of the live node (tests/conftest.py starts it; tests/harness.py has the classes)."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("onnx")

from tests.harness import Admin, HttpWorker, WsWorker


@pytest.fixture
def admin(server) -> Admin:
    return Admin(server.url)


@pytest.fixture(params=["http", "ws"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def worker_factory(server, transport):
    made = []

    def make(srv=None, kind: str | None = None):
        srv = srv or server
        kind = kind or transport
        w = HttpWorker(srv.url) if kind == "http" else WsWorker(srv.url, srv.ws_url)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()
