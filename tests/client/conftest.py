"""Fixtures of the worker SDK tests: a real grid node shared by a module (tests/harness.py's
LiveNode on an SQLite file), the transports, and the sync / async SDK adapters."""

from __future__ import annotations

import pytest

from tests.harness import LiveNode, make_settings

from .sdk_apis import AsyncApi, SyncApi


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    pytest.importorskip("starlette")
    node = LiveNode(make_settings(None, tmp_path_factory.mktemp("grid")))
    yield node
    node.stop()


@pytest.fixture(params=["ws", "http"])
def transport(request) -> str:
    return request.param


@pytest.fixture(params=["sync", "async"])
def api(request):
    a = SyncApi() if request.param == "sync" else AsyncApi()
    yield a
    a.close()
